//! Fused kernels for the `flex` CPU backend, with their own backward passes.
//!
//! The model is generic over `B: Backend`; these kernels exist for one
//! concrete backend. [`attention`] checks at run time whether `B` is `Flex`
//! (inference) or `Autodiff<Flex>` (training) and returns `None` for every
//! other backend, and the caller then runs the plain tensor formulation, which
//! is also the reference the parity tests compare against
//! (`model::tests::fast_attention_matches_the_reference_in_values_and_gradients`).
//!
//! Attention here is computed the flash-attention way, in tiles of queries:
//! each tile's scores against only the keys it sees (the causal part, inside
//! each query's document) are one GEMM, then a stable softmax per row, and
//! for backward only each row's log-sum-exp is kept. The `T × T`
//! probabilities are never stored, and backward recomputes them a tile at a
//! time. Queries, keys and values stay in the projections' `[batch, seq,
//! heads·head_dim]` layout (the GEMMs read them through strides), so no head
//! transposes are copied either, and RoPE is applied inside the kernel.

use std::any::TypeId;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor};

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnDims {
    pub batch: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl AttnDims {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    fn scale(&self) -> f32 {
        (self.head_dim as f32).sqrt().recip()
    }
    /// Keys `first..=last` visible to query `i` of row `b`.
    fn span(&self, first: &[u32], b: usize, i: usize) -> (usize, usize) {
        let last = self.seq_k - self.seq_q + i;
        let lo = first[b * self.seq_q + i] as usize;
        debug_assert!(lo <= last);
        (lo.min(last), last)
    }
}

/// Whether [`attention`] has a fused kernel for backend `B`. Setting the
/// environment variable `BATON_FUSED=off` turns the kernels off (the plain
/// tensor path runs), for comparisons and for ruling them out when debugging.
pub fn available<B: Backend>() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *OFF.get_or_init(|| std::env::var("BATON_FUSED").is_ok_and(|v| v == "off" || v == "0")) {
        return false;
    }
    #[cfg(feature = "flex")]
    {
        use burn::backend::{Autodiff, Flex};
        let id = TypeId::of::<B>();
        id == TypeId::of::<Flex>() || id == TypeId::of::<Autodiff<Flex>>()
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = TypeId::of::<B>;
        false
    }
}

/// Panics unless `B` has the fused kernels.
fn require<B: Backend>(kernel: &str) {
    assert!(
        available::<B>(),
        "no fused {kernel} kernel for {}",
        std::any::type_name::<B>()
    );
}

/// A kernel's f32 result back in the inputs' float type `dtype`.
fn restore<B: Backend, const D: usize>(out: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    match dtype {
        DType::F64 => out.cast(FloatDType::F64),
        DType::F16 => out.cast(FloatDType::F16),
        DType::BF16 => out.cast(FloatDType::BF16),
        _ => out,
    }
}

/// What the public functions run without `flex`, where [`available`] is false
/// and [`require`] has already panicked.
#[cfg(not(feature = "flex"))]
fn no_kernel<T>() -> T {
    unreachable!("fused kernels exist only for the flex backend")
}

/// Rotary-embedding tables for [`attention`], which then rotates the
/// queries and keys itself (and their gradients back) instead of the model
/// running the rotation as extra matmuls with column-rotated weights.
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// `[rows, head_dim]` row-major, each half repeating the same frequencies
    /// (HF's rotate-half convention, as [`crate::model::Rope`]).
    pub cos: Arc<Vec<f32>>,
    pub sin: Arc<Vec<f32>>,
    pub head_dim: usize,
    /// The table row of each token, `[batch·seq]` row-major.
    pub positions: Arc<Vec<u32>>,
}

/// Causal attention over rows: `q: [batch, seq_q, heads·head_dim]`,
/// `k, v: [batch, seq_k, kv_heads·head_dim]` (grouped-query heads share the
/// key/value head `h / (heads / kv_heads)`). With `rope`, queries and keys
/// are rotated here; without, they come rotated. Query `i`
/// of row `b` sees keys `first[b·seq_q + i] ..= seq_k − seq_q + i`. Returns
/// `[batch, seq_q, heads·head_dim]` in the inputs' float type (the kernel
/// computes in f32).
///
/// # Panics
/// When [`available`] is false for `B`.
pub fn attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    kv_heads: usize,
    first: Arc<Vec<u32>>,
    rope: Option<RopeTables>,
) -> Tensor<B, 3> {
    require::<B>("attention");
    let [batch, seq_q, qw] = q.dims();
    let [_, seq_k, _] = k.dims();
    let dims = AttnDims {
        batch,
        seq_q,
        seq_k,
        heads,
        kv_heads,
        head_dim: qw / heads,
    };
    assert_eq!(
        first.len(),
        batch * seq_q,
        "one first visible key per query"
    );
    let dtype = q.dtype();
    let f32s = |t: Tensor<B, 3>| t.cast(FloatDType::F32);
    #[cfg(feature = "flex")]
    let out = flex::attention(f32s(q), f32s(k), f32s(v), dims, first, rope);
    #[cfg(not(feature = "flex"))]
    let out = {
        let _ = (dims, first, f32s(q), k, v, rope);
        no_kernel()
    };
    restore(out, dtype)
}

/// Log-probability of each row's target under a log-softmax over the row:
/// `logits: [rows, vocab]`, `targets: [rows]` → `[rows]`. One pass over each
/// row forward (max, log-sum-exp, pick), one pass backward
/// (`g · (onehot − softmax)`, the softmax recomputed from the saved
/// log-sum-exp); no `[rows, vocab]` intermediate is kept but the logits.
///
/// # Panics
/// When [`available`] is false for `B`.
pub fn token_logprobs<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    require::<B>("log-softmax");
    let dtype = logits.dtype();
    let logits = logits.cast(FloatDType::F32);
    #[cfg(feature = "flex")]
    let out = flex::token_logprobs(logits, targets);
    #[cfg(not(feature = "flex"))]
    let out = {
        let _ = (logits, targets);
        no_kernel()
    };
    restore(out, dtype)
}

/// SwiGLU's gate: `silu(gate) · up`, elementwise over equal shapes, in one
/// pass forward and one backward (the sigmoid recomputed with the vectorised
/// [`exp`]) instead of the sigmoid, two products and their saved
/// intermediates.
///
/// # Panics
/// When [`available`] is false for `B`.
pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    require::<B>("SwiGLU");
    assert_eq!(gate.dims(), up.dims(), "gate and up shapes");
    let dtype = gate.dtype();
    let (gate, up) = (gate.cast(FloatDType::F32), up.cast(FloatDType::F32));
    #[cfg(feature = "flex")]
    let out = flex::swiglu(gate, up);
    #[cfg(not(feature = "flex"))]
    let out = {
        let _ = (gate, up);
        no_kernel()
    };
    restore(out, dtype)
}

/// RMSNorm over the last axis, `x / sqrt(mean(x²) + eps) · weight`, in one
/// pass forward (keeping each row's `1/rms`) and one backward, instead of
/// five tensor ops and their saved intermediates.
///
/// # Panics
/// When [`available`] is false for `B`.
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    require::<B>("RMSNorm");
    let dtype = x.dtype();
    let (x, weight) = (x.cast(FloatDType::F32), weight.cast(FloatDType::F32));
    #[cfg(feature = "flex")]
    let out = flex::rms_norm(x, weight, eps as f32);
    #[cfg(not(feature = "flex"))]
    let out = {
        let _ = (weight, eps);
        let _: Tensor<B, 3> = x;
        no_kernel()
    };
    restore(out, dtype)
}

#[cfg(feature = "flex")]
mod flex {
    use super::*;
    use burn::tensor::backend::BackendTypes;
    use burn::tensor::{TensorData, TensorPrimitive};
    use std::any::Any;

    /// Moves `value` into type `U` when `T` and `U` are the same type.
    fn cast<T: 'static, U: 'static>(value: T) -> Option<U> {
        let mut slot = Some(value);
        (&mut slot as &mut dyn Any)
            .downcast_mut::<Option<U>>()
            .and_then(Option::take)
    }
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};

    type AdPrimitive = <Autodiff<Flex> as BackendTypes>::FloatTensorPrimitive;

    fn primitive<B: Backend>(t: Tensor<B, 3>) -> B::FloatTensorPrimitive {
        t.into_primitive().tensor()
    }

    fn tensor<B: Backend>(p: B::FloatTensorPrimitive) -> Tensor<B, 3> {
        Tensor::from_primitive(TensorPrimitive::Float(p))
    }

    pub(super) fn attention<B: Backend>(
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        dims: AttnDims,
        first: Arc<Vec<u32>>,
        rope: Option<RopeTables>,
    ) -> Tensor<B, 3> {
        let (pq, pk, pv) = (primitive(q), primitive(k), primitive(v));
        if TypeId::of::<B>() == TypeId::of::<Flex>() {
            let (q, k, v): (FlexTensor, FlexTensor, FlexTensor) =
                (cast(pq).unwrap(), cast(pk).unwrap(), cast(pv).unwrap());
            let f = forward(&q, &k, &v, dims, &first, rope.as_ref());
            return tensor::<B>(cast(f.out).unwrap());
        }
        let (q, k, v): (AdPrimitive, AdPrimitive, AdPrimitive) =
            (cast(pq).unwrap(), cast(pk).unwrap(), cast(pv).unwrap());
        let out = autodiff_attention(q, k, v, dims, first, rope);
        tensor::<B>(cast(out).unwrap())
    }

    pub(super) fn token_logprobs<B: Backend>(
        logits: Tensor<B, 2>,
        targets: Tensor<B, 1, Int>,
    ) -> Tensor<B, 1> {
        let targets: FlexTensor = cast(targets.into_primitive()).expect("flex int tensors");
        let targets = targets.to_contiguous();
        let targets: Arc<Vec<i32>> = Arc::new(match targets.as_slice::<i32>() {
            Some(t) => t.to_vec(),
            None => targets
                .into_data()
                .convert::<i32>()
                .to_vec()
                .expect("integer targets"),
        });
        let p = logits.into_primitive().tensor();
        if TypeId::of::<B>() == TypeId::of::<Flex>() {
            let logits: FlexTensor = cast(p).unwrap();
            let (out, _) = logprob_forward(&logits, &targets);
            return Tensor::from_primitive(TensorPrimitive::Float(cast(out).unwrap()));
        }
        let logits: AdPrimitive = cast(p).unwrap();
        let (out, lse) = logprob_forward(&logits.primitive, &targets);
        let state = || LogProbState {
            logits: logits.primitive.clone(),
            targets,
            lse,
        };
        let out = record(LogProbs, [&logits], state, out);
        Tensor::from_primitive(TensorPrimitive::Float(cast(out).unwrap()))
    }

    fn logprob_forward(logits: &FlexTensor, targets: &[i32]) -> (FlexTensor, Arc<Vec<f32>>) {
        let logits = f32s(logits);
        let x = logits.as_slice::<f32>().unwrap();
        let rows = targets.len();
        let (out, lse) = logprob_forward_kernel(x, targets, x.len() / rows.max(1));
        (
            FlexTensor::from_data(TensorData::new(out, [rows])),
            Arc::new(lse),
        )
    }

    #[derive(Debug)]
    struct LogProbs;

    #[derive(Clone, Debug)]
    struct LogProbState {
        logits: FlexTensor,
        targets: Arc<Vec<i32>>,
        lse: Arc<Vec<f32>>,
    }

    impl Backward<Flex, 1> for LogProbs {
        type State = LogProbState;

        fn backward(
            self,
            ops: Ops<Self::State, 1>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = f32s(&grads.consume::<Flex>(&ops.node));
            let [parent] = ops.parents;
            let Some(node) = parent else { return };
            let s = &ops.state;
            let logits = f32s(&s.logits);
            let x = logits.as_slice::<f32>().unwrap();
            let rows = s.targets.len();
            let vocab = x.len() / rows.max(1);
            let g = logprob_backward_kernel(x, &s.targets, &s.lse, grad.as_slice().unwrap());
            let g = FlexTensor::from_data(TensorData::new(g, [rows, vocab]));
            grads.register::<Flex>(node.id, g);
        }
    }

    pub(super) fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
        let shape = gate.dims();
        let (pg, pu) = (primitive(gate), primitive(up));
        let run = |g: &FlexTensor, u: &FlexTensor| {
            let (g, u) = (f32s(g), f32s(u));
            let out = swiglu_forward_kernel(g.as_slice().unwrap(), u.as_slice().unwrap());
            FlexTensor::from_data(TensorData::new(out, shape))
        };
        if TypeId::of::<B>() == TypeId::of::<Flex>() {
            let (g, u): (FlexTensor, FlexTensor) = (cast(pg).unwrap(), cast(pu).unwrap());
            return tensor::<B>(cast(run(&g, &u)).unwrap());
        }
        let (g, u): (AdPrimitive, AdPrimitive) = (cast(pg).unwrap(), cast(pu).unwrap());
        let out = run(&g.primitive, &u.primitive);
        let state = || (g.primitive.clone(), u.primitive.clone());
        tensor::<B>(cast(record(SwiGlu { shape }, [&g, &u], state, out)).unwrap())
    }

    #[derive(Debug)]
    struct SwiGlu {
        shape: [usize; 3],
    }

    impl Backward<Flex, 2> for SwiGlu {
        type State = (FlexTensor, FlexTensor);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = f32s(&grads.consume::<Flex>(&ops.node));
            let (g, u) = (f32s(&ops.state.0), f32s(&ops.state.1));
            let (dg, du) = swiglu_backward_kernel(
                g.as_slice().unwrap(),
                u.as_slice().unwrap(),
                grad.as_slice().unwrap(),
            );
            let [pg, pu] = ops.parents;
            for (parent, d) in [(pg, dg), (pu, du)] {
                if let Some(node) = parent {
                    let d = FlexTensor::from_data(TensorData::new(d, self.shape));
                    grads.register::<Flex>(node.id, d);
                }
            }
        }
    }

    pub(super) fn rms_norm<B: Backend>(
        x: Tensor<B, 3>,
        weight: Tensor<B, 1>,
        eps: f32,
    ) -> Tensor<B, 3> {
        let shape = x.dims();
        let (px, pw) = (primitive(x), weight.into_primitive().tensor());
        let run = |x: &FlexTensor, w: &FlexTensor| {
            let (x, w) = (f32s(x), f32s(w));
            let (y, inv) = rms_forward_kernel(x.as_slice().unwrap(), w.as_slice().unwrap(), eps);
            (from_vec(y, shape), Arc::new(inv))
        };
        if TypeId::of::<B>() == TypeId::of::<Flex>() {
            let (x, w): (FlexTensor, FlexTensor) = (cast(px).unwrap(), cast(pw).unwrap());
            return tensor::<B>(cast(run(&x, &w).0).unwrap());
        }
        let (x, w): (AdPrimitive, AdPrimitive) = (cast(px).unwrap(), cast(pw).unwrap());
        let (out, inv) = run(&x.primitive, &w.primitive);
        let state = || (x.primitive.clone(), w.primitive.clone(), inv);
        tensor::<B>(cast(record(RmsNormOp { shape }, [&x, &w], state, out)).unwrap())
    }

    #[derive(Debug)]
    struct RmsNormOp {
        shape: [usize; 3],
    }

    impl Backward<Flex, 2> for RmsNormOp {
        type State = (FlexTensor, FlexTensor, Arc<Vec<f32>>);

        fn backward(
            self,
            ops: Ops<Self::State, 2>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let grad = f32s(&grads.consume::<Flex>(&ops.node));
            let (x, w) = (f32s(&ops.state.0), f32s(&ops.state.1));
            let (dx, dw) = rms_backward_kernel(
                x.as_slice().unwrap(),
                w.as_slice().unwrap(),
                &ops.state.2,
                grad.as_slice().unwrap(),
            );
            let [px, pw] = ops.parents;
            if let Some(node) = px {
                grads.register::<Flex>(node.id, from_vec(dx, self.shape));
            }
            if let Some(node) = pw {
                let d = FlexTensor::from_data(TensorData::new(dw, [self.shape[2]]));
                grads.register::<Flex>(node.id, d);
            }
        }
    }

    fn f32s(t: &FlexTensor) -> FlexTensor {
        t.to_contiguous()
    }

    fn from_vec(values: Vec<f32>, shape: [usize; 3]) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    /// What the forward pass computes and its backward pass reads.
    struct Forward {
        out: FlexTensor,
        /// Per-(row, head, query) log-sum-exp of the scaled scores.
        lse: Arc<Vec<f32>>,
        /// Queries and keys as the scores saw them (rotated).
        q: FlexTensor,
        k: FlexTensor,
    }

    fn forward(
        q: &FlexTensor,
        k: &FlexTensor,
        v: &FlexTensor,
        d: AttnDims,
        first: &[u32],
        rope: Option<&RopeTables>,
    ) -> Forward {
        let (mut q, mut k, v) = (f32s(q), f32s(k), f32s(v));
        if let Some(r) = rope {
            let rotate =
                |x: &FlexTensor, shape| from_vec(r.rotate(x.as_slice().unwrap(), false), shape);
            q = rotate(&q, [d.batch, d.seq_q, d.q_width()]);
            k = rotate(&k, [d.batch, d.seq_k, d.kv_width()]);
        }
        let (out, lse) = forward_kernel(
            q.as_slice().unwrap(),
            k.as_slice().unwrap(),
            v.as_slice().unwrap(),
            d,
            first,
        );
        Forward {
            out: from_vec(out, [d.batch, d.seq_q, d.q_width()]),
            lse: Arc::new(lse),
            q,
            k,
        }
    }

    /// Registers `op` on the autodiff graph with `parents`, keeping `state`
    /// (built only when some parent tracks gradients) for its backward pass.
    fn record<Op, const N: usize>(
        op: Op,
        parents: [&AdPrimitive; N],
        state: impl FnOnce() -> Op::State,
        out: FlexTensor,
    ) -> AdPrimitive
    where
        Op: Backward<Flex, N>,
    {
        match op
            .prepare::<NoCheckpointing>(parents.map(|p| p.node.clone()))
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(state(), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn autodiff_attention(
        q: AdPrimitive,
        k: AdPrimitive,
        v: AdPrimitive,
        dims: AttnDims,
        first: Arc<Vec<u32>>,
        rope: Option<RopeTables>,
    ) -> AdPrimitive {
        let f = forward(
            &q.primitive,
            &k.primitive,
            &v.primitive,
            dims,
            &first,
            rope.as_ref(),
        );
        let out = f.out.clone();
        let state = || AttnState {
            q: f.q,
            k: f.k,
            v: v.primitive.clone(),
            out: f.out,
            lse: f.lse,
        };
        record(
            FusedAttention { dims, first, rope },
            [&q, &k, &v],
            state,
            out,
        )
    }

    #[derive(Debug)]
    struct FusedAttention {
        dims: AttnDims,
        first: Arc<Vec<u32>>,
        rope: Option<RopeTables>,
    }

    #[derive(Clone, Debug)]
    struct AttnState {
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        out: FlexTensor,
        lse: Arc<Vec<f32>>,
    }

    impl Backward<Flex, 3> for FusedAttention {
        type State = AttnState;

        fn backward(
            self,
            ops: Ops<Self::State, 3>,
            grads: &mut Gradients,
            _checkpointer: &mut Checkpointer,
        ) {
            let d = self.dims;
            let grad_out = f32s(&grads.consume::<Flex>(&ops.node));
            let s = &ops.state;
            let (q, k, v, out) = (f32s(&s.q), f32s(&s.k), f32s(&s.v), f32s(&s.out));
            let (dq, dk, dv) = backward_kernel(
                Slices {
                    q: q.as_slice().unwrap(),
                    k: k.as_slice().unwrap(),
                    v: v.as_slice().unwrap(),
                    out: out.as_slice().unwrap(),
                    grad_out: grad_out.as_slice().unwrap(),
                    lse: &s.lse,
                },
                d,
                &self.first,
            );
            // Back through the rotation: its transpose is the inverse rotation.
            let (dq, dk) = match &self.rope {
                Some(r) => (r.rotate(&dq, true), r.rotate(&dk, true)),
                None => (dq, dk),
            };
            let [pq, pk, pv] = ops.parents;
            let q_shape = [d.batch, d.seq_q, d.q_width()];
            let kv_shape = [d.batch, d.seq_k, d.kv_width()];
            for (parent, grad, shape) in [(pq, dq, q_shape), (pk, dk, kv_shape), (pv, dv, kv_shape)]
            {
                if let Some(node) = parent {
                    grads.register::<Flex>(node.id, from_vec(grad, shape));
                }
            }
        }
    }
}

/// `eˣ` for `x ≤ 88`, branch-free so loops over it vectorise: `x = n·ln 2 + r`
/// with `|r| ≤ ln 2 / 2`, a degree-6 Taylor polynomial for `eʳ` (relative error
/// below 3e-7 there) and `2ⁿ` built in the exponent bits. Inputs below −87
/// give `e⁻⁸⁷` (~1.6e-38) instead of a denormal or zero.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    // ln 2 split in two so n·ln2 is exact to f32 precision.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// Whether the CPU runs AVX2 + FMA: the kernels then run a copy of their
/// loops compiled for it (twice the vector width of the x86-64 baseline).
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Calls `body(args)` through a copy compiled for AVX2 + FMA when the CPU
/// has them (twice the vector width of the x86-64 baseline), else directly.
/// `body` is `#[inline(always)]`, so its loops are compiled inside the copy.
macro_rules! with_avx2 {
    ($body:ident($($arg:expr),*) as ($($param:ident: $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            #[target_feature(enable = "avx2,fma")]
            fn wide($($param: $ty),*) -> $ret {
                $body($($param),*)
            }
            // SAFETY: the CPU has the features `wide` is compiled for.
            return unsafe { wide($($arg),*) };
        }
        $body($($arg),*)
    }};
}

impl RopeTables {
    /// Rotates every head of `x: [batch·seq, heads·head_dim]` by its token's
    /// angles, or by their negatives (`inverse`: the transpose, which maps the
    /// gradient of the rotated tensor to the gradient of its input).
    pub fn rotate(&self, x: &[f32], inverse: bool) -> Vec<f32> {
        with_avx2!(rotate_body(self, x, inverse) as (r: &RopeTables, x: &[f32], inverse: bool) -> Vec<f32>)
    }
}

#[inline(always)]
fn rotate_body(r: &RopeTables, x: &[f32], inverse: bool) -> Vec<f32> {
    let (hd, half) = (r.head_dim, r.head_dim / 2);
    let width = x.len() / r.positions.len().max(1);
    let sign = if inverse { -1.0 } else { 1.0 };
    let mut y = vec![0f32; x.len()];
    for ((xr, yr), &p) in x
        .chunks_exact(width)
        .zip(y.chunks_exact_mut(width))
        .zip(r.positions.iter())
    {
        let at = p as usize * hd;
        let (c, s) = (&r.cos[at..at + half], &r.sin[at..at + half]);
        for (xh, yh) in xr.chunks_exact(hd).zip(yr.chunks_exact_mut(hd)) {
            let (x1, x2) = xh.split_at(half);
            let (y1, y2) = yh.split_at_mut(half);
            for i in 0..half {
                let si = sign * s[i];
                y1[i] = x1[i] * c[i] - x2[i] * si;
                y2[i] = x2[i] * c[i] + x1[i] * si;
            }
        }
    }
    y
}

/// Queries per tile: each tile's scores against its visible keys are one
/// GEMM, and a tile wastes at most the upper half of its diagonal block.
const TILE: usize = 32;

/// A strided read-only matrix: element `(r, c)` is `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], at: usize, rs: usize, cs: usize) -> Self {
        Self {
            data: &data[at..],
            rs,
            cs,
        }
    }

    /// The same matrix transposed (no copy).
    fn t(self) -> Self {
        Self {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn check(&self, rows: usize, cols: usize) {
        if rows > 0 && cols > 0 {
            assert!((rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len());
        }
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + beta · lhs[m×k] · rhs[k×n]`, with
/// `dst` row-major at row stride `dst_rs` from `dst[0]`; single-threaded (the
/// callers already run one task per core).
#[allow(clippy::too_many_arguments)]
fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    [m, n, k]: [usize; 3],
    lhs: View,
    rhs: View,
    beta: f32,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len());
    lhs.check(m, k);
    rhs.check(k, n);
    // SAFETY: every element read or written lies inside the borrowed slices
    // (checked above, strides non-negative), and `dst` cannot alias them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One tile of queries `i0..i1` of row `b`, head `h`: the keys `lo..=hi`
/// that any of its queries sees, and where its slices start.
#[derive(Clone, Copy)]
struct Tile {
    i0: usize,
    rows: usize,
    lo: usize,
    keys: usize,
    /// Offset of query `i0`, head `h`, in `[batch, seq_q, heads·hd]`.
    q_at: usize,
    /// Offset of key `lo`, head `h / rep`, in `[batch, seq_k, kv_heads·hd]`.
    k_at: usize,
}

impl AttnDims {
    /// The query tiles of row `b`, head `h`.
    fn tiles(self, first: &[u32], b: usize, h: usize) -> impl Iterator<Item = Tile> + '_ {
        let kh = h / (self.heads / self.kv_heads);
        (0..self.seq_q).step_by(TILE).map(move |i0| {
            let i1 = (i0 + TILE).min(self.seq_q);
            let lo = (i0..i1)
                .map(|i| self.span(first, b, i).0)
                .min()
                .unwrap_or(0);
            let hi = self.span(first, b, i1 - 1).1;
            Tile {
                i0,
                rows: i1 - i0,
                lo,
                keys: hi + 1 - lo,
                q_at: at(b, i0, self.seq_q, self.q_width(), h, self.head_dim),
                k_at: at(b, lo, self.seq_k, self.kv_width(), kh, self.head_dim),
            }
        })
    }

    /// `s[r·keys + j] = scale · q_(i0+r) · k_(lo+j)` for the tile.
    fn tile_scores(self, t: Tile, q: &[f32], k: &[f32], s: &mut [f32]) {
        let (hd, qw, kw) = (self.head_dim, self.q_width(), self.kv_width());
        matmul(
            s,
            t.keys,
            [t.rows, t.keys, hd],
            View::new(q, t.q_at, qw, 1),
            View::new(k, t.k_at, kw, 1).t(),
            self.scale(),
            false,
        );
    }

    /// Row `r` of a tile's scores: the visible keys `a..=z` relative to `lo`.
    fn visible(self, first: &[u32], b: usize, t: Tile, r: usize) -> (usize, usize) {
        let (lo, hi) = self.span(first, b, t.i0 + r);
        (lo - t.lo, hi - t.lo)
    }
}

/// The forward kernel on plain slices: output `[batch, seq_q, heads·hd]` and
/// log-sum-exp `[batch, heads, seq_q]`.
pub fn forward_kernel(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
    first: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    with_avx2!(forward_body(q, k, v, d, first) as (q: &[f32], k: &[f32], v: &[f32], d: AttnDims, f: &[u32]) -> (Vec<f32>, Vec<f32>))
}

#[inline(always)]
fn forward_body(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: AttnDims,
    first: &[u32],
) -> (Vec<f32>, Vec<f32>) {
    let (hd, qw, kw) = (d.head_dim, d.q_width(), d.kv_width());
    let mut out = vec![0f32; d.batch * d.seq_q * qw];
    let mut lse = vec![0f32; d.batch * d.heads * d.seq_q];
    let mut p = vec![0f32; TILE * d.seq_k];
    for b in 0..d.batch {
        for h in 0..d.heads {
            for t in d.tiles(first, b, h) {
                d.tile_scores(t, q, k, &mut p);
                for (r, row) in p.chunks_exact_mut(t.keys).take(t.rows).enumerate() {
                    let (a, z) = d.visible(first, b, t, r);
                    row[..a].fill(0.0);
                    row[z + 1..].fill(0.0);
                    let vis = &mut row[a..=z];
                    let max = lanes(vis, f32::NEG_INFINITY, f32::max);
                    for x in vis.iter_mut() {
                        *x = exp(*x - max);
                    }
                    let sum = lanes(vis, 0.0, |a, b| a + b);
                    let inv = sum.recip();
                    for x in vis.iter_mut() {
                        *x *= inv;
                    }
                    lse[(b * d.heads + h) * d.seq_q + t.i0 + r] = max + sum.ln();
                }
                // O = P · V over the tile's keys.
                matmul(
                    &mut out[t.q_at..],
                    qw,
                    [t.rows, hd, t.keys],
                    View::new(&p, 0, t.keys, 1),
                    View::new(v, t.k_at, kw, 1),
                    1.0,
                    false,
                );
            }
        }
    }
    (out, lse)
}

/// Per row of `x: [rows, vocab]`: the target's log-probability and the
/// row's log-sum-exp.
pub fn logprob_forward_kernel(x: &[f32], targets: &[i32], vocab: usize) -> (Vec<f32>, Vec<f32>) {
    with_avx2!(logprob_forward_body(x, targets, vocab) as (x: &[f32], t: &[i32], vocab: usize) -> (Vec<f32>, Vec<f32>))
}

#[inline(always)]
fn logprob_forward_body(x: &[f32], targets: &[i32], vocab: usize) -> (Vec<f32>, Vec<f32>) {
    let mut out = Vec::with_capacity(targets.len());
    let mut lse = Vec::with_capacity(targets.len());
    let mut e = vec![0f32; vocab];
    for (row, &t) in x.chunks_exact(vocab).zip(targets) {
        let max = lanes(row, f32::NEG_INFINITY, f32::max);
        for (ej, &xj) in e.iter_mut().zip(row) {
            *ej = exp(xj - max);
        }
        let l = max + lanes(&e, 0.0, |a, b| a + b).ln();
        lse.push(l);
        out.push(row[t as usize] - l);
    }
    (out, lse)
}

/// `∂/∂x` of `Σ grad[r] · logprob[r]`: `grad[r] · (onehot(t_r) − softmax(x_r))`.
pub fn logprob_backward_kernel(x: &[f32], targets: &[i32], lse: &[f32], grad: &[f32]) -> Vec<f32> {
    with_avx2!(logprob_backward_body(x, targets, lse, grad) as (x: &[f32], t: &[i32], lse: &[f32], g: &[f32]) -> Vec<f32>)
}

#[inline(always)]
fn logprob_backward_body(x: &[f32], targets: &[i32], lse: &[f32], grad: &[f32]) -> Vec<f32> {
    let vocab = x.len() / targets.len().max(1);
    let mut out = vec![0f32; x.len()];
    for (r, (o, row)) in out
        .chunks_exact_mut(vocab)
        .zip(x.chunks_exact(vocab))
        .enumerate()
    {
        let (l, g) = (lse[r], grad[r]);
        for (oj, &xj) in o.iter_mut().zip(row) {
            *oj = -g * exp(xj - l);
        }
        o[targets[r] as usize] += g;
    }
    out
}

/// `silu(g) · u` elementwise.
pub fn swiglu_forward_kernel(g: &[f32], u: &[f32]) -> Vec<f32> {
    with_avx2!(swiglu_forward_body(g, u) as (g: &[f32], u: &[f32]) -> Vec<f32>)
}

#[inline(always)]
fn swiglu_forward_body(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| g * u / (1.0 + exp(-g)))
        .collect()
}

/// Gradients of `Σ grad · silu(g) · u`: `grad · u · σ(g)(1 + g(1 − σ(g)))`
/// for `g` and `grad · silu(g)` for `u`.
pub fn swiglu_backward_kernel(g: &[f32], u: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    with_avx2!(swiglu_backward_body(g, u, grad) as (g: &[f32], u: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>))
}

#[inline(always)]
fn swiglu_backward_body(g: &[f32], u: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0f32; g.len()];
    let mut du = vec![0f32; g.len()];
    for i in 0..g.len().min(u.len()).min(grad.len()) {
        let (x, y, d) = (g[i], u[i], grad[i]);
        let s = 1.0 / (1.0 + exp(-x));
        dg[i] = d * y * s * (1.0 + x * (1.0 - s));
        du[i] = d * x * s;
    }
    (dg, du)
}

/// Per row of `x: [rows, d]`: `x · r · w` with `r = 1/sqrt(mean(x²) + eps)`,
/// and each row's `r`.
pub fn rms_forward_kernel(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    with_avx2!(rms_forward_body(x, w, eps) as (x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>))
}

#[inline(always)]
fn rms_forward_body(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut y = vec![0f32; x.len()];
    let mut inv = Vec::with_capacity(x.len() / d.max(1));
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let r = (dot(xr, xr) / d as f32 + eps).sqrt().recip();
        for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
            *y = x * r * w;
        }
        inv.push(r);
    }
    (y, inv)
}

/// Gradients of `Σ grad · rmsnorm(x, w)`: with `g = grad ∘ w`, per row
/// `dx = r·g − x · r³ · mean(g ∘ x)`, and `dw = Σ_rows grad ∘ x · r`.
pub fn rms_backward_kernel(
    x: &[f32],
    w: &[f32],
    inv: &[f32],
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    with_avx2!(rms_backward_body(x, w, inv, grad) as (x: &[f32], w: &[f32], inv: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>))
}

#[inline(always)]
fn rms_backward_body(x: &[f32], w: &[f32], inv: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut dx = vec![0f32; x.len()];
    let mut dw = vec![0f32; d];
    let mut g = vec![0f32; d];
    let rows = x.chunks_exact(d).zip(grad.chunks_exact(d));
    for (((xr, gr), dxr), &r) in rows.zip(dx.chunks_exact_mut(d)).zip(inv) {
        for ((g, &go), &w) in g.iter_mut().zip(gr).zip(w) {
            *g = go * w;
        }
        let coef = r * r * r * dot(&g, xr) / d as f32;
        for (((dx, &g), &x), (dw, &go)) in dxr.iter_mut().zip(&g).zip(xr).zip(dw.iter_mut().zip(gr))
        {
            *dx = r * g - coef * x;
            *dw += go * x * r;
        }
    }
    (dx, dw)
}

/// Inputs of [`backward_kernel`].
pub struct Slices<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub out: &'a [f32],
    pub grad_out: &'a [f32],
    pub lse: &'a [f32],
}

/// Gradients with respect to `q`, `k` and `v`, recomputing each probability
/// from the saved log-sum-exp: `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))`.
pub fn backward_kernel(s: Slices, d: AttnDims, first: &[u32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    with_avx2!(backward_body(&s, d, first) as (s: &Slices, d: AttnDims, f: &[u32]) -> (Vec<f32>, Vec<f32>, Vec<f32>))
}

#[inline(always)]
fn backward_body(s: &Slices, d: AttnDims, first: &[u32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (hd, qw, kw) = (d.head_dim, d.q_width(), d.kv_width());
    let scale = d.scale();
    let mut dq = vec![0f32; s.q.len()];
    let mut dk = vec![0f32; s.k.len()];
    let mut dv = vec![0f32; s.v.len()];
    let (mut p, mut ds) = (vec![0f32; TILE * d.seq_k], vec![0f32; TILE * d.seq_k]);
    for b in 0..d.batch {
        for h in 0..d.heads {
            for t in d.tiles(first, b, h) {
                let n = t.keys;
                // P, recomputed from the saved log-sum-exp.
                d.tile_scores(t, s.q, s.k, &mut p);
                // dP = dO · Vᵀ.
                matmul(
                    &mut ds,
                    n,
                    [t.rows, n, hd],
                    View::new(s.grad_out, t.q_at, qw, 1),
                    View::new(s.v, t.k_at, kw, 1).t(),
                    1.0,
                    false,
                );
                for (r, (row, drow)) in p
                    .chunks_exact_mut(n)
                    .zip(ds.chunks_exact_mut(n))
                    .take(t.rows)
                    .enumerate()
                {
                    let (a, z) = d.visible(first, b, t, r);
                    let qo = t.q_at + r * qw;
                    let lse = s.lse[(b * d.heads + h) * d.seq_q + t.i0 + r];
                    let delta = dot(&s.grad_out[qo..qo + hd], &s.out[qo..qo + hd]);
                    row[..a].fill(0.0);
                    row[z + 1..].fill(0.0);
                    drow[..a].fill(0.0);
                    drow[z + 1..].fill(0.0);
                    for (x, g) in row[a..=z].iter_mut().zip(&mut drow[a..=z]) {
                        *x = exp(*x - lse);
                        *g = *x * (*g - delta) * scale; // dS, with the score scale
                    }
                }
                let dsv = View::new(&ds, 0, n, 1);
                let pv = View::new(&p, 0, n, 1);
                // dQ = dS · K.
                matmul(
                    &mut dq[t.q_at..],
                    qw,
                    [t.rows, hd, n],
                    dsv,
                    View::new(s.k, t.k_at, kw, 1),
                    1.0,
                    false,
                );
                // dK += dSᵀ · Q and dV += Pᵀ · dO over the tile's keys.
                for (dst, lhs, rhs) in [(&mut dk, dsv, s.q), (&mut dv, pv, s.grad_out)] {
                    let rhs = View::new(rhs, t.q_at, qw, 1);
                    matmul(
                        &mut dst[t.k_at..],
                        kw,
                        [n, hd, t.rows],
                        lhs.t(),
                        rhs,
                        1.0,
                        true,
                    );
                }
            }
        }
    }
    (dq, dk, dv)
}

/// A reduction of `x` by `f` with eight independent lanes, so it vectorises
/// (a plain fold is one serial chain).
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &b| f(a, b));
    for c in chunks {
        for l in 0..8 {
            acc[l] = f(acc[l], c[l]);
        }
    }
    acc.iter().fold(tail, |a, &b| f(a, b))
}

/// `Σ a·b` with eight independent accumulators, so it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Row-major offset of head slice `(b, t, h)` in a `[batch, seq, width]` tensor.
#[inline(always)]
fn at(b: usize, t: usize, seq: usize, width: usize, h: usize, hd: usize) -> usize {
    (b * seq + t) * width + h * hd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Inner, Train};
    use burn::tensor::Distribution;
    use burn::tensor::TensorData;

    /// Elementwise `|a − b| ≤ tol · (1 + |b|)`.
    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
    }

    #[test]
    fn fused_log_probs_match_log_softmax_in_values_and_gradients() {
        if !available::<Train>() {
            assert!(!cfg!(feature = "flex") || std::env::var_os("BATON_FUSED").is_some());
            return;
        }
        let device = Default::default();
        // 37 columns: the vectorised loops' remainders are exercised too.
        let (rows, vocab) = (6, 37);
        let x = Tensor::<Inner, 2>::random([rows, vocab], Distribution::Normal(0.0, 3.0), &device)
            .into_data();
        let targets = TensorData::new(vec![0i32, 36, 5, 5, 17, 8], [rows]);
        let weights = TensorData::new(vec![1.0f32, 0.5, -2.0, 0.0, 3.0, 1.0], [rows]);
        let run = |fused: bool| {
            let x = Tensor::<Train, 2>::from_data(x.clone(), &device).require_grad();
            let t = Tensor::<Train, 1, Int>::from_data(targets.clone(), &device);
            let lp = if fused {
                token_logprobs(x.clone(), t)
            } else {
                burn::tensor::activation::log_softmax(x.clone(), 1)
                    .gather(1, t.reshape([rows, 1]))
                    .reshape([rows])
            };
            let w = Tensor::<Train, 1>::from_data(weights.clone(), &device);
            let grads = lp.clone().mul(w).sum().backward();
            let v: Vec<f32> = lp.inner().into_data().to_vec().unwrap();
            let g: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
            (v, g)
        };
        let ((vf, gf), (vr, gr)) = (run(true), run(false));
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(diff(&vf, &vr) < 1e-5, "values {vf:?} vs {vr:?}");
        assert!(
            diff(&gf, &gr) < 1e-5,
            "gradients differ by {}",
            diff(&gf, &gr)
        );
        assert!(vf.iter().all(|v| *v < 0.0) && gf.iter().any(|g| *g != 0.0));
    }

    #[test]
    fn fused_swiglu_matches_silu_times_up_in_values_and_gradients() {
        if !available::<Train>() {
            assert!(!cfg!(feature = "flex") || std::env::var_os("BATON_FUSED").is_some());
            return;
        }
        let device = Default::default();
        // 3 × 5 × 7 = 105 elements: whole vectors and a remainder; values to ±12.
        let data = || {
            Tensor::<Inner, 3>::random([3, 5, 7], Distribution::Normal(0.0, 4.0), &device)
                .into_data()
        };
        let (g0, u0, w0) = (data(), data(), data());
        let run = |fused: bool| {
            let g = Tensor::<Train, 3>::from_data(g0.clone(), &device).require_grad();
            let u = Tensor::<Train, 3>::from_data(u0.clone(), &device).require_grad();
            let out = if fused {
                swiglu(g.clone(), u.clone())
            } else {
                burn::tensor::activation::silu(g.clone()).mul(u.clone())
            };
            let w = Tensor::<Train, 3>::from_data(w0.clone(), &device);
            let grads = out.clone().mul(w).sum().backward();
            let flat = |t: Tensor<Inner, 3>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
            (
                flat(out.inner()),
                flat(g.grad(&grads).unwrap()),
                flat(u.grad(&grads).unwrap()),
            )
        };
        let (fused, plain) = (run(true), run(false));
        let close = |a: &[f32], b: &[f32]| close(a, b, 1e-5);
        assert!(close(&fused.0, &plain.0), "values");
        assert!(close(&fused.1, &plain.1), "d/d gate");
        assert!(close(&fused.2, &plain.2), "d/d up");
        assert!(fused.1.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn fused_rms_norm_matches_the_tensor_formulation_in_values_and_gradients() {
        if !available::<Train>() {
            assert!(!cfg!(feature = "flex") || std::env::var_os("BATON_FUSED").is_some());
            return;
        }
        let device = Default::default();
        // Rows of 37: whole vectors and a remainder.
        let (shape, d) = ([3, 5, 37], 37);
        let x0 =
            Tensor::<Inner, 3>::random(shape, Distribution::Normal(0.5, 2.0), &device).into_data();
        let w0 =
            Tensor::<Inner, 1>::random([d], Distribution::Normal(1.0, 0.5), &device).into_data();
        let c0 =
            Tensor::<Inner, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device).into_data();
        let eps = 1e-5;
        let run = |fused: bool| {
            let x = Tensor::<Train, 3>::from_data(x0.clone(), &device).require_grad();
            let w = Tensor::<Train, 1>::from_data(w0.clone(), &device).require_grad();
            let out = if fused {
                rms_norm(x.clone(), w.clone(), eps)
            } else {
                let rms = x.clone().square().mean_dim(2).add_scalar(eps).sqrt();
                x.clone().div(rms).mul(w.clone().unsqueeze())
            };
            let c = Tensor::<Train, 3>::from_data(c0.clone(), &device);
            let grads = out.clone().mul(c).sum().backward();
            let flat = |t: Tensor<Inner, 3>| -> Vec<f32> { t.into_data().to_vec().unwrap() };
            (
                flat(out.inner()),
                flat(x.grad(&grads).unwrap()),
                w.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
            )
        };
        let (fused, plain) = (run(true), run(false));
        let close = |a: &[f32], b: &[f32]| a.len() == b.len() && close(a, b, 1e-4);
        assert!(close(&fused.0, &plain.0), "values");
        assert!(close(&fused.1, &plain.1), "d/dx");
        assert!(close(&fused.2, &plain.2), "d/dw");
        assert!(fused.1.iter().any(|&x| x != 0.0));
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1e30) > 0.0 && exp(-1e30) < 1e-37);
    }
}
