//! The language model's positional embeddings: axial (default), absolute (learned), or the
//! fixed sinusoid that comes with rotary embeddings.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::kernels::rotary::RotaryTable;
use crate::params::{Builder, Init};

/// A language model's positional embedding.
#[derive(Clone, Debug)]
pub enum PositionalEmbedding {
    /// `pos[i] = weights.0[i / W] + weights.1[i % W]`, covering `ceil(max_seq_len / W) · W`
    /// positions.
    Axial {
        /// `weights.0`, [1, A, 1, emb_dim].
        rows: Tensor,
        /// `weights.1`, [1, 1, W, emb_dim].
        cols: Tensor,
        /// W, the local window.
        window: usize,
    },
    /// `pos[i] = emb.weight[i]`.
    Absolute {
        /// [max_seq_len, emb_dim].
        table: Tensor,
    },
    /// `cat(sin, cos)` of the positions, not trained.
    Fixed {
        /// [max_seq_len, emb_dim].
        table: Tensor,
    },
}

impl PositionalEmbedding {
    pub(crate) fn new(b: &Builder, c: &Config) -> Result<Self> {
        let d = c.emb_dim();
        if c.use_rotary_emb {
            let t = RotaryTable::new(d, c.max_seq_len);
            let table = Tensor::from_vec(t.buffer(), (c.max_seq_len, d), &b.device())?;
            Ok(Self::Fixed { table: b.buffer("emb", table)? })
        } else if c.use_axial_pos_emb {
            let w = c.local_attn_window_size;
            let a = c.max_seq_len.div_ceil(w);
            let rows = b.get("weights.0", &[1, a, 1, d], Init::Normal(1.0))?;
            let cols = b.get("weights.1", &[1, 1, w, d], Init::Normal(1.0))?;
            Ok(Self::Axial { rows, cols, window: w })
        } else {
            Ok(Self::Absolute { table: b.pp("emb").get("weight", &[c.max_seq_len, d], Init::Normal(1.0))? })
        }
    }

    /// How many positions are covered.
    pub fn len(&self) -> usize {
        match self {
            Self::Axial { rows, window, .. } => rows.dims()[1] * window,
            Self::Absolute { table } | Self::Fixed { table } => table.dims()[0],
        }
    }

    /// Embeddings of positions `offset .. offset + n`: [n, emb_dim].
    pub fn forward(&self, offset: usize, n: usize) -> Result<Tensor> {
        if offset + n > self.len() {
            return Err(Error::input(format!("sequence of {} positions (after padding) exceeds the {} positions of the positional embedding; raise max_seq_len", offset + n, self.len())));
        }
        match self {
            Self::Axial { rows, cols, window } => {
                // Only the rows (of W positions each) that the range touches.
                let (first, last) = (offset / window, (offset + n - 1) / window);
                let d = rows.dims()[3];
                if first == last {
                    // Within one row (every decoding step): only the n positions, not the row's
                    // whole grid of W.
                    let r = rows.narrow(1, first, 1)?.reshape((1, d))?;
                    return Ok(r.broadcast_add(&cols.reshape((*window, d))?.narrow(0, offset % window, n)?)?);
                }
                let r = rows.narrow(1, first, last - first + 1)?.reshape((last - first + 1, 1, d))?;
                let grid = r.broadcast_add(&cols.reshape((1, *window, d))?)?.reshape(((last - first + 1) * window, d))?;
                Ok(grid.narrow(0, offset - first * window, n)?)
            }
            Self::Absolute { table } | Self::Fixed { table } => Ok(table.narrow(0, offset, n)?),
        }
    }
}

/// The per-layer rotary tables of a rotary model (`layer_pos_emb`), saved as the buffer
/// `layer_pos_emb.emb` like the reference does.
pub(crate) fn rotary_table(b: &Builder, dim_head: usize, len: usize) -> Result<Arc<RotaryTable>> {
    let t = RotaryTable::new(dim_head, len);
    let buffer = Tensor::from_vec(t.buffer(), (len, dim_head), &b.device())?.to_dtype(DType::F32)?;
    b.buffer("emb", buffer)?;
    Ok(Arc::new(t))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// Any range of an axial embedding, within one row of W positions or across rows, is that
    /// range of the whole table, to the bit.
    #[test]
    fn axial_ranges_are_slices_of_the_whole_table() {
        let mut c = Config::new(16, 8, 1, 20);
        c.local_attn_window_size = 4;
        let b = Builder::init(3, &Device::Cpu, DType::F32);
        let pos = PositionalEmbedding::new(&b, &c).unwrap();
        assert!(matches!(pos, PositionalEmbedding::Axial { .. }));
        let whole = pos.forward(0, pos.len()).unwrap().to_vec2::<f32>().unwrap();
        for (offset, n) in [(0, 1), (3, 1), (5, 2), (4, 4), (2, 5), (7, 9), (19, 1)] {
            let part = pos.forward(offset, n).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(part, whole[offset..offset + n], "offset {offset}, n {n}");
        }
        assert!(pos.forward(20, 1).is_err());
    }
}
