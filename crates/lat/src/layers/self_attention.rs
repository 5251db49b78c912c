//! Self-attention (the reference's `SelfAttention`): queries, keys and values from one
//! projection of the input; the first `local_heads` heads attend with windowed softmax
//! attention, the others with global linear attention, causal or not; then the output
//! projection and its dropout. The heads themselves are one fused kernel
//! ([`crate::kernels::self_attention`]).
//!
//! Decoding keeps, per key/value head, the local heads' window of keys and values and the
//! global heads' running sums: each new position costs the same whatever came before.

use candle_core::{DType, Tensor};
use rayon::prelude::*;

use super::heads::HeadLayout;
use super::{project_out, project_out_backward, Call, Layer, Mode, Step, SITE_ATTN, SITE_OUT};
use crate::config::TransformerConfig;
use crate::error::{Error, Result};
use crate::graph::Grads;
use crate::kernels::causal_linear::LinearState;
use crate::kernels::local::{Dropout, LocalCache};
use crate::kernels::matmul::matmul;
use crate::kernels::self_attention::{self as fused, HeadSpec};
use crate::kernels::{self, SharedOut};
use crate::nn::{rows2, Linear};
use crate::params::Builder;

#[derive(Clone, Debug)]
pub(crate) struct SelfAttention {
    pub layout: HeadLayout,
    pub causal: bool,
    /// Blind-spot bucket of causal global heads (`blindspot_size`).
    pub bucket: usize,
    /// Window of the local heads.
    pub window: usize,
    /// Dropout after the output projection (`attn_layer_dropout`).
    pub dropout: f64,
    /// Dropout on the local heads' attention probabilities.
    pub attn_dropout: f64,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

pub(crate) struct Saved {
    qkv: Tensor,
    /// The kernel's flat result: the head outputs and their statistics.
    flat: Tensor,
    att: Tensor,
    out_mask: Option<Tensor>,
    attn_drop: Option<Dropout>,
}

/// One stream's state: per key/value head of the local heads their window, of the global heads
/// their running sums.
#[derive(Clone, Debug)]
pub(crate) struct State {
    pub local: Vec<LocalCache>,
    pub global: Vec<LinearState>,
}

impl SelfAttention {
    /// The main self-attention of layer `layer`.
    pub fn new(b: &Builder, c: &TransformerConfig, layer: usize) -> Result<Self> {
        Self::with_layout(b, c, Self::layout(c, layer), c.causal, c.blindspot_size)
    }

    pub fn with_layout(b: &Builder, c: &TransformerConfig, layout: HeadLayout, causal: bool, bucket: usize) -> Result<Self> {
        let [to_q, to_k, to_v, to_out] = layout.projections(b, c.dim)?;
        Ok(Self { to_q, to_k, to_v, to_out, layout, causal, bucket, window: c.local_attn_window_size, dropout: c.attn_layer_dropout, attn_dropout: c.attn_dropout })
    }

    /// The most bytes one stream's state holds for heads laid out as `layout`: per key/value
    /// head, two windows of keys and values (local) or the running sums and a pending bucket.
    pub fn max_state_bytes(layout: HeadLayout, window: usize, bucket: usize) -> usize {
        let dh = layout.dim_head;
        layout.kv_groups().iter().map(|&(first, _)| if first < layout.local_heads { LocalCache::max_bytes(dh, window) } else { LinearState::max_bytes(dh, dh, bucket) }).sum()
    }

    /// The main self-attention's layout in layer `layer`.
    pub fn layout(c: &TransformerConfig, layer: usize) -> HeadLayout {
        HeadLayout { heads: c.heads, dim_head: c.dim_head(), local_heads: c.local_heads(layer), one_kv_head: c.one_kv_head }
    }

    pub fn head_spec(&self) -> HeadSpec {
        let l = &self.layout;
        HeadSpec { heads: l.heads, local_heads: l.local_heads, dim_head: l.dim_head, causal: self.causal, bucket: self.bucket, window: self.window }
    }

    /// The fused projection [batch, n, 3 · heads · dim_head] of queries, keys and values
    /// (shared key/value heads repeated for every head that reads them).
    fn qkv(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        let l = &self.layout;
        let (b, n, _) = h.dims3()?;
        let x = rows2(h)?;
        let (q, kv) = if self.to_q.packed.is_some() {
            // Packed weights cannot be concatenated: one product each.
            let product = |p: &Linear| rows2(&p.product(h, mode, false)?);
            let (q, k, v) = (product(&self.to_q)?, product(&self.to_k)?, product(&self.to_v)?);
            if !l.one_kv_head {
                return Ok(Tensor::cat(&[&q, &k, &v], 1)?.reshape((b, n, 3 * l.inner()))?);
            }
            (q, Tensor::cat(&[&k, &v], 1)?)
        } else {
            let [q, k, v] = [&self.to_q, &self.to_k, &self.to_v].map(|p| p.weight_for(mode));
            if !l.one_kv_head {
                let all = Tensor::cat(&[&q, &k, &v], 0)?;
                return Ok(matmul(&x, &all.t()?)?.reshape((b, n, all.dim(0)?))?);
            }
            (matmul(&x, &q.t()?)?, matmul(&x, &Tensor::cat(&[&k, &v], 0)?.t()?)?)
        };
        let width = l.kv_heads() * l.dim_head;
        let (k, v) = (l.expand(&kv.narrow(1, 0, width)?)?, l.expand(&kv.narrow(1, width, width)?)?);
        Ok(Tensor::cat(&[&q, &k.flatten_from(1)?, &v.flatten_from(1)?], 1)?.reshape((b, n, 3 * l.inner()))?)
    }

    /// The backward pass of [`SelfAttention::qkv`]: dh, with the weight gradients in `grads`.
    fn qkv_backward(&self, h: &Tensor, dqkv: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let l = &self.layout;
        let he = l.inner();
        if !l.one_kv_head {
            let (x, d) = (rows2(h)?, rows2(dqkv)?);
            let dw = matmul(&d.t()?, &x)?;
            for (i, layer) in [&self.to_q, &self.to_k, &self.to_v].into_iter().enumerate() {
                grads.param(&layer.weight, dw.narrow(0, i * he, he)?)?;
            }
            let w = Tensor::cat(&[&self.to_q.weight.detach(), &self.to_k.weight.detach(), &self.to_v.weight.detach()], 0)?;
            return Ok(matmul(&d, &w)?.reshape(h.dims())?);
        }
        let (b, n, _) = dqkv.dims3()?;
        let shared = |part: usize| l.reduce(&dqkv.narrow(2, part * he, he)?.reshape((b, n, l.heads, l.dim_head))?);
        let dh = self.to_q.backward(h, &dqkv.narrow(2, 0, he)?, grads)?;
        let dh = (dh + self.to_k.backward(h, &shared(1)?, grads)?)?;
        Ok((dh + self.to_v.backward(h, &shared(2)?, grads)?)?)
    }

    fn attn_dropout(&self, call: &Call) -> Option<Dropout> {
        call.dropout_seed(SITE_ATTN).filter(|_| self.attn_dropout > 0.0 && self.layout.local_heads > 0).map(|seed| Dropout { p: self.attn_dropout, seed })
    }

    /// The heads and the output projection on `qkv`.
    fn attend(&self, qkv: Tensor, call: &Call, mode: Mode) -> Result<(Tensor, Option<Saved>)> {
        let attn_drop = self.attn_dropout(call);
        let (att, flat) = match mode {
            Mode::Graph | Mode::Decode => (fused::self_attention(&qkv, self.head_spec(), call.mask(), call.rotary(), attn_drop)?, None),
            Mode::Record => {
                let (att, flat) = fused::forward_saved(&qkv, self.head_spec(), call.mask(), call.rotary(), attn_drop)?;
                (att, Some(flat))
            }
        };
        let (y, out_mask) = project_out(&self.to_out, &att, self.dropout, call.dropout_seed(SITE_OUT), mode)?;
        Ok((y, flat.map(|flat| Saved { qkv, flat, att, out_mask, attn_drop })))
    }

    /// The forward pass, and each row's state after its first `lens(row)` positions.
    pub fn prefill_rows(&self, h: &Tensor, call: &Call, lens: impl Fn(usize) -> usize) -> Result<(Tensor, Vec<State>)> {
        self.check_causal()?;
        let qkv = self.qkv(h, Mode::Graph)?;
        let states = self.states(&qkv, lens, call)?;
        Ok((self.attend(qkv, call, Mode::Graph)?.0, states))
    }

    /// Only causal attention has a recurrent form.
    fn check_causal(&self) -> Result<()> {
        match self.causal {
            true => Ok(()),
            false => Err(Error::input("decoding needs causal self-attention")),
        }
    }

    /// Each row's state after the first `lens(row)` positions of `qkv` [rows, n, 3 · inner].
    fn states(&self, qkv: &Tensor, lens: impl Fn(usize) -> usize, call: &Call) -> Result<Vec<State>> {
        let l = &self.layout;
        let (dh, he) = (l.dim_head, l.inner());
        let rows = qkv.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        let states = rows.iter().enumerate().map(|(r, row)| {
            let n = lens(r);
            self.state_after(|part, h| {
                let mut v: Vec<f32> = row[..n].iter().flat_map(|p| p[part * he + h * dh..part * he + (h + 1) * dh].iter().copied()).collect();
                if let (1, Some((table, offset))) = (part, call.rotary()) {
                    table.rotate_rows(&mut v, dh, offset, false);
                }
                v
            })
        });
        Ok(states.collect())
    }

    /// The state after the positions whose keys (`part` 1, rotated) and values (`part` 2) of
    /// head `h` are `prefix(part, h)`, for every key/value head.
    fn state_after(&self, prefix: impl Fn(usize, usize) -> Vec<f32>) -> State {
        let l = &self.layout;
        let mut state = State { local: vec![], global: vec![] };
        for (first, _) in l.kv_groups() {
            let (k, v) = (prefix(1, first), prefix(2, first));
            if first < l.local_heads {
                state.local.push(LocalCache::from_prefix(&k, &v, l.dim_head, self.window));
            } else {
                state.global.push(LinearState::from_prefix(&k, &v, l.dim_head, l.dim_head, self.bucket));
            }
        }
        state
    }

    /// A decoding step of rows [rows, t, dim]: row `r`'s position `i` (at `step.positions[r] +
    /// i`) advances the state `rows[r][pick(position)]` (each row has one state, or axial layers
    /// one per strided sequence). Every (row, key/value head) pair runs as a task of its own:
    /// a head's positions follow each other, but heads and rows are independent, so a prompt
    /// piece of one stream spreads over every thread as a batch of streams does.
    pub fn step_rows(&self, h: &Tensor, rows: &mut [&mut [State]], pick: impl Fn(usize) -> usize + Sync, step: &Step) -> Result<Tensor> {
        let l = &self.layout;
        let (b, t, _) = h.dims3()?;
        if rows.len() != b {
            return Err(stale());
        }
        let (dh, width) = (l.dim_head, l.inner());
        // Queries of every head; keys and values of each key/value head (not yet repeated).
        let [q, k, v]: [Tensor; 3] = Linear::apply_all(&[&self.to_q, &self.to_k, &self.to_v], h, Mode::Decode)?.try_into().expect("three products");
        let f32s = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
        let (q, k, v) = (f32s(q)?, f32s(k)?, f32s(v)?);
        let kv_width = l.kv_heads() * dh;
        let groups = l.kv_groups();
        // Task (r, g): key/value head g of row r, in each of the row's states. Every row's heads
        // lie in one vector, [row][group][state], of which each task takes its run.
        let counts: Vec<usize> = rows.iter().map(|states| states.len()).collect();
        let mut heads: Vec<Head> = Vec::with_capacity(groups.len() * counts.iter().sum::<usize>());
        for states in rows.iter_mut() {
            // Each state's heads come in group order.
            let mut each: Vec<_> = states.iter_mut().map(|state| (state.local.iter_mut(), state.global.iter_mut())).collect();
            for &(first, _) in &groups {
                for (local, global) in each.iter_mut() {
                    heads.push(if first < l.local_heads { Head::Local(local.next().ok_or_else(stale)?) } else { Head::Global(global.next().ok_or_else(stale)?) });
                }
            }
        }
        let mut tasks = Vec::with_capacity(b * groups.len());
        let mut rest = heads.as_mut_slice();
        for (r, &n) in counts.iter().enumerate() {
            for g in 0..groups.len() {
                let (mine, after) = rest.split_at_mut(n);
                tasks.push((r, g, mine));
                rest = after;
            }
        }
        let mut out = vec![0f32; b * t * width];
        let shared = SharedOut::new(&mut out);
        let attend = |(q_all, k_all, v_all): (&[f32], &[f32], &[f32]), (r, g, heads): &mut (usize, usize, &mut [Head])| -> Result<()> {
            let (first, count) = groups[*g];
            let qw = count * dh;
            // Where position i's queries (and output) and its key and value are.
            let at = |i: usize| ((*r * t + i) * width + first * dh, (*r * t + i) * kv_width + *g * dh);
            let rotate = |x: &mut [f32], i: usize| {
                if let Some(table) = step.rotary {
                    table.rotate(x, dh, step.positions[*r] + i);
                }
            };
            let mut i = 0;
            while i < t {
                // Positions i..end advance the same state.
                let state = pick(step.positions[*r] + i);
                let end = (i + 1..t).find(|&j| pick(step.positions[*r] + j) != state).unwrap_or(t);
                match heads.get_mut(state).ok_or_else(stale)? {
                    Head::Local(cache) if end - i > 1 => {
                        let len = end - i;
                        let (mut qs, mut ks, mut vs) = (vec![0f32; len * qw], vec![0f32; len * dh], vec![0f32; len * dh]);
                        for j in 0..len {
                            let (q_at, kv_at) = at(i + j);
                            let (q, k) = (&mut qs[j * qw..(j + 1) * qw], &mut ks[j * dh..(j + 1) * dh]);
                            q.copy_from_slice(&q_all[q_at..q_at + qw]);
                            k.copy_from_slice(&k_all[kv_at..kv_at + dh]);
                            rotate(q, i + j);
                            rotate(k, i + j);
                            vs[j * dh..(j + 1) * dh].copy_from_slice(&v_all[kv_at..kv_at + dh]);
                        }
                        let mut o = vec![0f32; len * qw];
                        cache.extend(&qs, &ks, &vs, &mut o);
                        for (j, o) in o.chunks(qw).enumerate() {
                            // SAFETY: task (r, g) alone writes the columns of group g in row r's positions.
                            unsafe { shared.write(at(i + j).0, o) };
                        }
                    }
                    head => {
                        let mut o = vec![0f32; qw];
                        for j in i..end {
                            let (q_at, kv_at) = at(j);
                            let (mut q, mut k) = (&q_all[q_at..q_at + qw], &k_all[kv_at..kv_at + dh]);
                            let rotated;
                            if step.rotary.is_some() {
                                rotated = [q, k].map(|x| {
                                    let mut x = x.to_vec();
                                    rotate(&mut x, j);
                                    x
                                });
                                (q, k) = (&rotated[0], &rotated[1]);
                            }
                            head.step(q, k, &v_all[kv_at..kv_at + dh], &mut o);
                            // SAFETY: as above.
                            unsafe { shared.write(q_at, &o) };
                        }
                    }
                }
                i = end;
            }
            Ok(())
        };
        kernels::read::<f32, _>(&[&q, &k, &v], |s| tasks.par_iter_mut().try_for_each(|task| attend((s[0], s[1], s[2]), task)))??;
        let merged = Tensor::from_vec(out, (b, t, width), h.device())?.to_dtype(h.dtype())?;
        self.to_out.apply(&merged, Mode::Decode)
    }
}

/// One key/value head's decoding state, of either kind.
enum Head<'a> {
    Local(&'a mut LocalCache),
    Global(&'a mut LinearState),
}

impl Head<'_> {
    /// Attends from the next position with the queries of the heads that read this key/value
    /// head, and takes in its key and value.
    fn step(&mut self, queries: &[f32], k: &[f32], v: &[f32], out: &mut [f32]) {
        match self {
            Head::Local(cache) => cache.step(queries, k, v, out),
            Head::Global(sums) => sums.step(queries, k, v, out),
        }
    }
}

fn stale() -> Error {
    Error::input("the decoding state does not belong to this model")
}

impl Layer for SelfAttention {
    type Saved = Saved;
    type State = State;
    const HAND_WRITTEN: bool = true;

    fn forward(&self, h: &Tensor, call: &Call, mode: Mode) -> Result<(Tensor, Option<Saved>)> {
        self.attend(self.qkv(h, mode)?, call, mode)
    }

    fn backward(&self, s: Saved, h: &Tensor, dy: &Tensor, call: &Call, grads: &mut Grads) -> Result<Tensor> {
        let Saved { qkv, flat, att, out_mask, attn_drop } = s;
        let datt = project_out_backward(&self.to_out, &att, out_mask.as_ref(), dy, grads)?;
        drop(att);
        let dqkv = fused::backward(&qkv, &flat, &datt, self.head_spec(), call.mask(), call.rotary(), attn_drop)?;
        // Long sequences make these the largest tensors: free them before the next ones.
        drop((qkv, flat, datt));
        self.qkv_backward(h, &dqkv, grads)
    }

    fn prefill(&self, h: &Tensor, call: &Call, n: usize) -> Result<(Tensor, Vec<State>)> {
        self.prefill_rows(h, call, |_| n)
    }

    fn start(&self, _call: &Call, rows: usize) -> Result<Vec<State>> {
        self.check_causal()?;
        Ok(vec![self.state_after(|_, _| Vec::new()); rows])
    }

    fn step(&self, h: &Tensor, states: &mut [&mut State], step: &Step) -> Result<Tensor> {
        let mut rows: Vec<&mut [State]> = states.iter_mut().map(|s| std::slice::from_mut(&mut **s)).collect();
        self.step_rows(h, &mut rows, |_| 0, step)
    }

    fn state_bytes(state: &State) -> usize {
        state.local.iter().map(LocalCache::bytes).sum::<usize>() + state.global.iter().map(LinearState::bytes).sum::<usize>()
    }
}
