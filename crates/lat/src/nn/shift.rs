//! Token shifting (`PreShiftTokens`): the first segments of the features are taken from
//! neighbouring positions (shifts (1, 0) when causal, (1, 0, -1) otherwise), the remainder is
//! kept. Unlike the reference, which reads a kwarg that is never passed, the mask is applied:
//! padding never leaks into real positions through a shift.

use candle_core::{Tensor, D};

use crate::error::Result;

#[derive(Clone, Debug)]
/// Token shifting before a block's layer.
pub(crate) struct Shift {
    /// How far each segment moves: (1, 0) when causal, (1, 0, -1) otherwise.
    pub shifts: Vec<isize>,
}

impl Shift {
    /// The reference's shifts for a causal or non-causal model.
    pub fn new(causal: bool) -> Self {
        Self { shifts: if causal { vec![1, 0] } else { vec![1, 0, -1] } }
    }

    /// `x`: [batch, n, dim]; `mask`: [batch, n], nonzero = keep.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (_, n, d) = x.dims3()?;
        let f = d / self.shifts.len();
        let mut parts = Vec::with_capacity(self.shifts.len() + 1);
        for (i, &a) in self.shifts.iter().enumerate() {
            let seg = x.narrow(D::Minus1, i * f, f)?;
            parts.push(if a == 0 { seg } else { shift(&seg, a, n, mask)? });
        }
        let used = f * self.shifts.len();
        if used < d {
            parts.push(x.narrow(D::Minus1, used, d - used)?);
        }
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }
}

impl Shift {
    /// The gradient of [`Shift::forward`]'s input for the gradient `dy` of its output.
    pub fn backward(&self, dy: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (_, n, d) = dy.dims3()?;
        let f = d / self.shifts.len();
        let mut parts = Vec::with_capacity(self.shifts.len() + 1);
        for (i, &a) in self.shifts.iter().enumerate() {
            let seg = dy.narrow(D::Minus1, i * f, f)?;
            parts.push(if a == 0 {
                seg
            } else {
                let back = shift(&seg, -a, n, None)?;
                match mask {
                    Some(m) => back.broadcast_mul(&m.to_dtype(back.dtype())?.unsqueeze(D::Minus1)?)?,
                    None => back,
                }
            });
        }
        let used = f * self.shifts.len();
        if used < d {
            parts.push(dy.narrow(D::Minus1, used, d - used)?);
        }
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }

    /// Decoding with a causal shift: `x` [batch, t, dim] holds the new positions and `prev`
    /// [batch, 1, dim] the position before them.
    pub fn step(&self, x: &Tensor, prev: &Tensor) -> Result<Tensor> {
        let (_, t, d) = x.dims3()?;
        let f = d / self.shifts.len();
        let mut parts = Vec::with_capacity(self.shifts.len() + 1);
        for (i, &a) in self.shifts.iter().enumerate() {
            let seg = x.narrow(D::Minus1, i * f, f)?;
            parts.push(match a {
                0 => seg,
                1 if t == 1 => prev.narrow(D::Minus1, i * f, f)?,
                1 => Tensor::cat(&[&prev.narrow(D::Minus1, i * f, f)?, &seg.narrow(1, 0, t - 1)?], 1)?,
                _ => return Err(crate::Error::input("decoding needs a causal model (token shifts of 0 and 1)")),
            });
        }
        let used = f * self.shifts.len();
        if used < d {
            parts.push(x.narrow(D::Minus1, used, d - used)?);
        }
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }
}

/// out[i] = t[i - a], zeros where that is outside the sequence.
fn shift(t: &Tensor, a: isize, n: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let t = match mask {
        Some(m) => t.broadcast_mul(&m.to_dtype(t.dtype())?.unsqueeze(D::Minus1)?)?,
        None => t.clone(),
    };
    let k = a.unsigned_abs();
    if k >= n {
        return Ok(t.zeros_like()?);
    }
    Ok(if a > 0 { t.narrow(1, 0, n - k)?.pad_with_zeros(1, k, 0)? } else { t.narrow(1, k, n - k)?.pad_with_zeros(1, 0, k)? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn segments_follow_the_reference() {
        // dim 7, non-causal: f = 2; features 0-1 from i-1, 2-3 from i, 4-5 from i+1, 6 from i.
        let x = Tensor::arange(0f32, 21.0, &Device::Cpu).unwrap().reshape((1, 3, 7)).unwrap();
        let y = Shift::new(false).forward(&x, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y[1], vec![0.0, 1.0, 9.0, 10.0, 18.0, 19.0, 13.0]);
        assert_eq!(y[0][..2], [0.0, 0.0]);
        assert_eq!(y[2][4..6], [0.0, 0.0]);
        let m = Tensor::from_vec(vec![1u8, 1, 0], (1, 3), &Device::Cpu).unwrap();
        let y = Shift::new(false).forward(&x, Some(&m)).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y[1][4..6], [0.0, 0.0], "padding must not leak backwards");
    }
}
