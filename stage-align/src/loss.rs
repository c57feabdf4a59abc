//! Direct alignment's one algebra of losses.
//!
//! Every loss reads the same per-sequence statistics — the policy's summed
//! log-prob of each reply, its token count and (when the loss needs one) the
//! reference model's summed log-prob — and combines a *score* (reference
//! log-ratio, mean log-prob, or log-odds; summed or averaged over tokens as a
//! property of the loss) with a *link* (log-sigmoid, hinge, square, sigmoid)
//! over a *ranking* (pairwise chosen-vs-rejected, or pointwise per reply).
//!
//! Parameters are named for what they are: `temperature` (β), `align_weight`
//! (λ), `margin` (γ), `label_smoothing` (ε).

use std::fmt;

use baton_core::burn::tensor::backend::Backend;
use baton_core::burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// One direct-alignment objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// DPO, sigmoid link; with `label_smoothing` > 0 it is conservative DPO.
    Dpo,
    /// Identity preference optimisation: squared distance of the (mean) log-ratio margin from 1/(2β).
    Ipo,
    /// SLiC-style hinge on the log-ratio margin.
    Hinge,
    /// Robust DPO: unbiased under a label-flip rate of `label_smoothing`.
    Robust,
    /// Reference-free, length-normalised, with a target margin γ.
    Simpo,
    /// NLL on chosen + λ · odds-ratio term, β inside the sigmoid.
    Orpo,
    /// NLL on chosen + λ · pointwise odds terms, β inside the sigmoid.
    Asft,
    /// Noise-contrastive alignment (pairwise form).
    Nca,
    /// DPO plus calibration of each log-ratio to ±1/(2β).
    CalDpo,
    /// DPO-Positive (Smaug): DPO whose margin is lowered by λ times how far
    /// the chosen reply's log-prob fell below the reference's, so the
    /// chosen reply is not pushed down with the rejected one.
    Dpop,
    /// Anchored preference optimisation, zero anchor.
    ApoZero,
    /// Kahneman–Tversky optimisation: pointwise, works on unpaired labels.
    Kto,
    /// Mean token NLL of the chosen reply (an SFT term, for mixes such as RPO).
    Nll,
}

impl LossKind {
    pub const ALL: [LossKind; 13] = [
        LossKind::Dpo,
        LossKind::Ipo,
        LossKind::Hinge,
        LossKind::Robust,
        LossKind::Simpo,
        LossKind::Orpo,
        LossKind::Asft,
        LossKind::Nca,
        LossKind::CalDpo,
        LossKind::Dpop,
        LossKind::ApoZero,
        LossKind::Kto,
        LossKind::Nll,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LossKind::Dpo => "dpo",
            LossKind::Ipo => "ipo",
            LossKind::Hinge => "hinge",
            LossKind::Robust => "robust",
            LossKind::Simpo => "simpo",
            LossKind::Orpo => "orpo",
            LossKind::Asft => "asft",
            LossKind::Nca => "nca",
            LossKind::CalDpo => "cal_dpo",
            LossKind::Dpop => "dpop",
            LossKind::ApoZero => "apo_zero",
            LossKind::Kto => "kto",
            LossKind::Nll => "nll",
        }
    }

    /// How this loss scores a reply.
    pub fn score(self) -> Score {
        match self {
            LossKind::Dpo
            | LossKind::Hinge
            | LossKind::Robust
            | LossKind::Nca
            | LossKind::CalDpo
            | LossKind::Dpop
            | LossKind::ApoZero
            | LossKind::Kto => Score::LogRatio { mean: false },
            LossKind::Ipo => Score::LogRatio { mean: true },
            LossKind::Simpo | LossKind::Nll => Score::LogProb { mean: true },
            LossKind::Orpo | LossKind::Asft => Score::LogOdds,
        }
    }

    /// Whether the loss compares a chosen with a rejected reply of the same
    /// prompt (pairwise) or scores each reply on its own (pointwise).
    pub fn pairwise(self) -> bool {
        !matches!(self, LossKind::Kto | LossKind::Asft | LossKind::Nll)
    }
}

/// How a loss scores one reply `y` of prompt `x` (π = policy, ρ = reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    /// log π(y|x) − log ρ(y|x), summed over tokens or averaged.
    LogRatio { mean: bool },
    /// log π(y|x), summed over tokens or averaged.
    LogProb { mean: bool },
    /// log(p / (1 − p)) with p = exp(mean token log-prob).
    LogOdds,
}

impl Score {
    pub fn needs_reference(self) -> bool {
        matches!(self, Score::LogRatio { .. })
    }
}

/// A weighted sum of losses, written `dpo`, `dpo+0.5*nll`, or an alias:
/// `rpo` = `dpo+1*nll`, `cdpo` = `dpo` (conservative when label_smoothing > 0).
#[derive(Clone, Debug, PartialEq)]
pub struct LossSpec {
    pub terms: Vec<(f64, LossKind)>,
}

impl LossSpec {
    pub fn parse(text: &str) -> Result<LossSpec, String> {
        let known = || {
            let mut names: Vec<&str> = LossKind::ALL.iter().map(|k| k.name()).collect();
            names.extend(["rpo", "cdpo"]);
            names.join(", ")
        };
        let mut terms = Vec::new();
        for part in text.split('+') {
            let part = part.trim();
            let (weight, name) = match part.split_once('*') {
                Some((w, n)) => (
                    w.trim()
                        .parse::<f64>()
                        .map_err(|_| format!("loss \"{text}\": bad weight \"{}\"", w.trim()))?,
                    n.trim(),
                ),
                None => (1.0, part),
            };
            match name {
                "rpo" => {
                    terms.push((weight, LossKind::Dpo));
                    terms.push((weight, LossKind::Nll));
                }
                "cdpo" => terms.push((weight, LossKind::Dpo)),
                _ => {
                    let kind = LossKind::ALL
                        .into_iter()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| format!("unknown loss \"{name}\" (known: {})", known()))?;
                    terms.push((weight, kind));
                }
            }
        }
        if terms.is_empty() {
            return Err("loss is empty".into());
        }
        Ok(LossSpec { terms })
    }

    pub fn needs_reference(&self) -> bool {
        self.terms.iter().any(|(_, k)| k.score().needs_reference())
    }

    /// True when every term can train on unpaired, labelled replies.
    pub fn pointwise(&self) -> bool {
        self.terms.iter().all(|(_, k)| !k.pairwise())
    }
}

impl fmt::Display for LossSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .terms
            .iter()
            .map(|(w, k)| {
                if *w == 1.0 {
                    k.name().to_string()
                } else {
                    format!("{w}*{}", k.name())
                }
            })
            .collect();
        f.write_str(&parts.join("+"))
    }
}

/// The loss hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossParams {
    /// β: scale of the score inside the link.
    pub temperature: f64,
    /// λ: weight of the alignment term next to the NLL term (ORPO, ASFT).
    pub align_weight: f64,
    /// γ: target margin (SimPO).
    pub margin: f64,
    /// ε: assumed rate of flipped preference labels (DPO, robust DPO, SimPO).
    pub label_smoothing: f64,
}

impl Default for LossParams {
    fn default() -> Self {
        Self {
            temperature: 0.1,
            align_weight: 1.0,
            margin: 0.5,
            label_smoothing: 0.0,
        }
    }
}

impl LossParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "align.temperature must be > 0 (got {})",
                self.temperature
            ));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(format!(
                "align.label_smoothing must be in [0, 0.5) (got {})",
                self.label_smoothing
            ));
        }
        if !(self.align_weight >= 0.0 && self.align_weight.is_finite()) {
            return Err(format!(
                "align.align_weight must be >= 0 (got {})",
                self.align_weight
            ));
        }
        if !self.margin.is_finite() {
            return Err("align.margin must be finite".into());
        }
        Ok(())
    }
}

/// Per-reply statistics of one side (chosen or rejected), each `[n]`.
#[derive(Clone, Debug)]
pub struct Side<B: Backend> {
    /// Policy log-prob of the reply, summed over its tokens.
    pub logp: Tensor<B, 1>,
    /// Token count of each reply (a constant).
    pub tokens: Tensor<B, 1>,
    /// Reference log-prob, summed (a constant); needed by log-ratio scores.
    pub reference: Option<Tensor<B, 1>>,
}

impl<B: Backend> Side<B> {
    pub fn new(logp: Tensor<B, 1>, tokens: &[f32], reference: Option<&[f32]>) -> Self {
        let device = logp.device();
        let constant =
            |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device);
        Self {
            tokens: constant(tokens),
            reference: reference.map(constant),
            logp,
        }
    }

    /// The score of each reply under `score`.
    pub fn score(&self, score: Score) -> Tensor<B, 1> {
        match score {
            Score::LogRatio { mean } => {
                let reference = self
                    .reference
                    .clone()
                    .expect("a log-ratio score needs reference log-probs");
                let ratio = self.logp.clone() - reference;
                if mean {
                    ratio / self.tokens.clone()
                } else {
                    ratio
                }
            }
            Score::LogProb { mean } => {
                if mean {
                    self.logp.clone() / self.tokens.clone()
                } else {
                    self.logp.clone()
                }
            }
            Score::LogOdds => {
                let mean = self.logp.clone() / self.tokens.clone();
                mean.clone() - log1mexp(mean)
            }
        }
    }
}

/// The summed loss of a batch and the rewards behind it.
pub struct LossOutput<B: Backend> {
    /// Sum over pairs (pointwise terms: over replies): a `[1]` tensor.
    pub loss: Tensor<B, 1>,
    /// β · score of the first term, per chosen / rejected reply (detached use only).
    pub chosen_rewards: Tensor<B, 1>,
    pub rejected_rewards: Tensor<B, 1>,
}

/// Evaluates `spec` on chosen and rejected replies. Pairwise terms need both
/// sides of equal length (reply i of each side shares a prompt); pointwise
/// terms treat `chosen` as desirable and `rejected` as undesirable replies.
pub fn alignment_loss<B: Backend>(
    spec: &LossSpec,
    params: &LossParams,
    chosen: &Side<B>,
    rejected: &Side<B>,
) -> LossOutput<B> {
    let beta = params.temperature;
    let mut total: Option<Tensor<B, 1>> = None;
    for &(weight, kind) in &spec.terms {
        let term = loss_term(kind, params, chosen, rejected).mul_scalar(weight);
        total = Some(match total {
            Some(t) => t + term,
            None => term,
        });
    }
    let score = spec.terms[0].1.score();
    LossOutput {
        loss: total.expect("a loss spec has at least one term"),
        chosen_rewards: chosen.score(score).mul_scalar(beta).detach(),
        rejected_rewards: rejected.score(score).mul_scalar(beta).detach(),
    }
}

/// One term, summed: `[1]`.
fn loss_term<B: Backend>(
    kind: LossKind,
    p: &LossParams,
    chosen: &Side<B>,
    rejected: &Side<B>,
) -> Tensor<B, 1> {
    let beta = p.temperature;
    let eps = p.label_smoothing;
    let score = kind.score();
    let sc = chosen.score(score);
    let sr = rejected.score(score);
    // −log σ(x), stably.
    let nls = |x: Tensor<B, 1>| log_sigmoid(x).neg();
    let per_item = match kind {
        LossKind::Dpo => {
            let h = (sc - sr).mul_scalar(beta);
            nls(h.clone()).mul_scalar(1.0 - eps) + nls(h.neg()).mul_scalar(eps)
        }
        LossKind::Robust => {
            let h = (sc - sr).mul_scalar(beta);
            (nls(h.clone()).mul_scalar(1.0 - eps) - nls(h.neg()).mul_scalar(eps))
                .div_scalar(1.0 - 2.0 * eps)
        }
        LossKind::Ipo => (sc - sr).sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
        LossKind::Hinge => {
            baton_core::burn::tensor::activation::relu((sc - sr).mul_scalar(-beta).add_scalar(1.0))
        }
        LossKind::Simpo => {
            let h = (sc - sr).mul_scalar(beta).sub_scalar(p.margin);
            nls(h.clone()).mul_scalar(1.0 - eps) + nls(h.neg()).mul_scalar(eps)
        }
        LossKind::Orpo => {
            let nll = mean_nll(chosen);
            nll + nls((sc - sr).mul_scalar(beta)).mul_scalar(p.align_weight)
        }
        LossKind::Asft => {
            // Pointwise: NLL and a desirable term per chosen reply, an
            // undesirable term per rejected reply.
            let desirable = nls(sc.mul_scalar(beta)).sum();
            let undesirable = nls(sr.mul_scalar(-beta)).sum();
            return mean_nll(chosen).sum() + (desirable + undesirable).mul_scalar(p.align_weight);
        }
        LossKind::Nca => {
            let (rc, rr) = (sc.mul_scalar(beta), sr.mul_scalar(beta));
            nls(rc.clone()) + nls(rc.neg()).mul_scalar(0.5) + nls(rr.neg()).mul_scalar(0.5)
        }
        LossKind::CalDpo => {
            let target = 1.0 / (2.0 * beta);
            nls((sc.clone() - sr.clone()).mul_scalar(beta))
                + sc.sub_scalar(target).powi_scalar(2)
                + sr.add_scalar(target).powi_scalar(2)
        }
        LossKind::Dpop => {
            // max(0, log ρ(y_w) − log π(y_w)) = relu(−s_c).
            let drop = baton_core::burn::tensor::activation::relu(sc.clone().neg());
            nls((sc - sr - drop.mul_scalar(p.align_weight)).mul_scalar(beta))
        }
        LossKind::ApoZero => {
            let sig = baton_core::burn::tensor::activation::sigmoid::<1, B>;
            sig(sc.mul_scalar(beta)).neg().add_scalar(1.0) + sig(sr.mul_scalar(beta))
        }
        LossKind::Kto => {
            // Reference point z₀: the batch's mean log-ratio, clamped at 0 and
            // not differentiated (the KL estimate of the KTO paper, taken over
            // every reply in the batch).
            let n = (sc.dims()[0] + sr.dims()[0]).max(1) as f64;
            let z0 = (sc.clone().detach().sum() + sr.clone().detach().sum())
                .div_scalar(n)
                .clamp_min(0.0);
            let sig = baton_core::burn::tensor::activation::sigmoid::<1, B>;
            let desirable = sig((sc - z0.clone()).mul_scalar(beta))
                .neg()
                .add_scalar(1.0);
            let undesirable = sig((z0 - sr).mul_scalar(beta)).neg().add_scalar(1.0);
            return desirable.sum() + undesirable.sum();
        }
        LossKind::Nll => mean_nll(chosen),
    };
    per_item.sum()
}

/// What a batch's summed loss is normalised by: its pairs, or for unpaired
/// replies half their number (so both kinds of data weigh alike).
pub fn pair_count(chosen: usize, rejected: usize) -> f64 {
    (chosen + rejected) as f64 / 2.0
}

/// Mean token NLL of each reply of a side.
fn mean_nll<B: Backend>(side: &Side<B>) -> Tensor<B, 1> {
    (side.logp.clone() / side.tokens.clone()).neg()
}

/// log σ(x) = min(x, 0) − log1p(exp(−|x|)): no overflow for any x.
pub fn log_sigmoid<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let negative_part = x.clone().clamp_max(0.0);
    negative_part - x.abs().neg().exp().log1p()
}

/// log(1 − exp(a)) for a ≤ 0, accurate as a → 0⁻ (a series for 1 − eᵃ there,
/// since f32 cannot subtract) and finite at a = 0.
pub fn log1mexp<B: Backend, const D: usize>(a: Tensor<B, D>) -> Tensor<B, D> {
    let a = a.clamp_max(0.0);
    let x = a.clone().neg();
    // 1 − e^{−x} = x − x²/2 + x³/6 − x⁴/24 + …
    let horner = x.clone().mul_scalar(-1.0 / 24.0).add_scalar(1.0 / 6.0);
    let horner = (x.clone() * horner).add_scalar(-0.5);
    let horner = (x.clone() * horner).add_scalar(1.0);
    let series = x.clone() * horner;
    let direct = a.exp().neg().add_scalar(1.0);
    let small = x.lower_elem(1e-2);
    direct.mask_where(small, series).clamp_min(1e-30).log()
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::backend::{Inner, Train};
    use baton_core::burn::tensor::ElementConversion;
    fn sigma(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }
    fn ln_sigma(x: f64) -> f64 {
        sigma(x).ln()
    }

    /// Two pairs of per-reply statistics, as plain numbers.
    struct Case {
        c: [f64; 2],
        r: [f64; 2],
        nc: [f64; 2],
        nr: [f64; 2],
        rc: [f64; 2],
        rr: [f64; 2],
    }

    const CASE: Case = Case {
        c: [-4.0, -6.5],
        r: [-5.0, -6.0],
        nc: [2.0, 3.0],
        nr: [4.0, 3.0],
        rc: [-4.5, -6.2],
        rr: [-4.8, -6.4],
    };

    fn sides<B: Backend>(case: &Case, device: &B::Device) -> (Side<B>, Side<B>) {
        let t = |v: [f64; 2]| {
            Tensor::<B, 1>::from_data(TensorData::new(vec![v[0] as f32, v[1] as f32], [2]), device)
        };
        let f = |v: [f64; 2]| [v[0] as f32, v[1] as f32];
        (
            Side::new(t(case.c), &f(case.nc), Some(&f(case.rc))),
            Side::new(t(case.r), &f(case.nr), Some(&f(case.rr))),
        )
    }

    /// The expected summed loss, written per pair from each paper's formula.
    fn expected(kind: LossKind, p: &LossParams, k: &Case) -> f64 {
        let (b, e, g, l) = (p.temperature, p.label_smoothing, p.margin, p.align_weight);
        let log_odds = |lp: f64, n: f64| {
            let m = lp / n;
            m - (1.0 - m.exp()).ln()
        };
        let pair = |i: usize| -> f64 {
            let (c, r, nc, nr, rc, rr) = (k.c[i], k.r[i], k.nc[i], k.nr[i], k.rc[i], k.rr[i]);
            let h = (c - rc) - (r - rr);
            match kind {
                LossKind::Dpo => -(1.0 - e) * ln_sigma(b * h) - e * ln_sigma(-b * h),
                LossKind::Robust => {
                    (-(1.0 - e) * ln_sigma(b * h) + e * ln_sigma(-b * h)) / (1.0 - 2.0 * e)
                }
                LossKind::Ipo => {
                    let hm = (c - rc) / nc - (r - rr) / nr;
                    (hm - 1.0 / (2.0 * b)).powi(2)
                }
                LossKind::Hinge => (1.0 - b * h).max(0.0),
                LossKind::Simpo => {
                    let z = b * (c / nc - r / nr) - g;
                    -(1.0 - e) * ln_sigma(z) - e * ln_sigma(-z)
                }
                LossKind::Orpo => -c / nc - l * ln_sigma(b * (log_odds(c, nc) - log_odds(r, nr))),
                LossKind::Asft => {
                    -c / nc - l * (ln_sigma(b * log_odds(c, nc)) + ln_sigma(-b * log_odds(r, nr)))
                }
                LossKind::Nca => {
                    let (xc, xr) = (b * (c - rc), b * (r - rr));
                    -ln_sigma(xc) - 0.5 * ln_sigma(-xc) - 0.5 * ln_sigma(-xr)
                }
                LossKind::CalDpo => {
                    let (xc, xr) = (c - rc, r - rr);
                    -ln_sigma(b * (xc - xr))
                        + (xc - 1.0 / (2.0 * b)).powi(2)
                        + (xr + 1.0 / (2.0 * b)).powi(2)
                }
                LossKind::Dpop => -ln_sigma(b * (h - l * (rc - c).max(0.0))),
                LossKind::ApoZero => (1.0 - sigma(b * (c - rc))) + sigma(b * (r - rr)),
                LossKind::Kto => {
                    let all = [
                        k.c[0] - k.rc[0],
                        k.c[1] - k.rc[1],
                        k.r[0] - k.rr[0],
                        k.r[1] - k.rr[1],
                    ];
                    let z0 = (all.iter().sum::<f64>() / 4.0).max(0.0);
                    (1.0 - sigma(b * ((c - rc) - z0))) + (1.0 - sigma(b * (z0 - (r - rr))))
                }
                LossKind::Nll => -c / nc,
            }
        };
        pair(0) + pair(1)
    }

    fn params() -> LossParams {
        LossParams {
            temperature: 0.7,
            align_weight: 0.6,
            margin: 0.3,
            label_smoothing: 0.2,
        }
    }

    #[test]
    fn every_loss_matches_its_closed_form() {
        let device = Default::default();
        let p = params();
        for kind in LossKind::ALL {
            let (c, r) = sides::<Inner>(&CASE, &device);
            let spec = LossSpec {
                terms: vec![(1.0, kind)],
            };
            let got: f64 = alignment_loss(&spec, &p, &c, &r).loss.into_scalar().elem();
            let want = expected(kind, &p, &CASE);
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{}: got {got}, closed form {want}",
                kind.name()
            );
        }
    }

    #[test]
    fn mixes_add_their_weighted_terms() {
        let device = Default::default();
        let p = params();
        let spec = LossSpec::parse("rpo").unwrap();
        assert_eq!(spec.terms, vec![(1.0, LossKind::Dpo), (1.0, LossKind::Nll)]);
        let spec = LossSpec::parse("dpo + 0.25*nll").unwrap();
        let (c, r) = sides::<Inner>(&CASE, &device);
        let got: f64 = alignment_loss(&spec, &p, &c, &r).loss.into_scalar().elem();
        let want = expected(LossKind::Dpo, &p, &CASE) + 0.25 * expected(LossKind::Nll, &p, &CASE);
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        assert!(
            LossSpec::parse("dpoo")
                .unwrap_err()
                .contains("unknown loss \"dpoo\"")
        );
        assert!(LossSpec::parse("x*dpo").is_err());
    }

    #[test]
    fn every_loss_raises_chosen_and_lowers_rejected() {
        // At the start of alignment the policy is the reference: log-ratios are 0.
        let device = Default::default();
        let p = LossParams {
            label_smoothing: 0.1,
            ..LossParams::default()
        };
        let case = Case {
            c: [-4.0, -6.0],
            r: [-5.0, -6.5],
            nc: [2.0, 3.0],
            nr: [3.0, 3.0],
            rc: [-4.0, -6.0],
            rr: [-5.0, -6.5],
        };
        for kind in LossKind::ALL {
            let (c, r) = sides::<Train>(&case, &device);
            let c = Side {
                logp: c.logp.require_grad(),
                ..c
            };
            let r = Side {
                logp: r.logp.require_grad(),
                ..r
            };
            let spec = LossSpec {
                terms: vec![(1.0, kind)],
            };
            let grads = alignment_loss(&spec, &p, &c, &r).loss.backward();
            let gc: Vec<f32> = c.logp.grad(&grads).unwrap().to_data().to_vec().unwrap();
            assert!(
                gc.iter().all(|&g| g < 0.0),
                "{}: descent must raise chosen log-probs (grad {gc:?})",
                kind.name()
            );
            if kind == LossKind::Nll {
                continue; // NLL does not look at the rejected reply.
            }
            let gr: Vec<f32> = r.logp.grad(&grads).unwrap().to_data().to_vec().unwrap();
            assert!(
                gr.iter().all(|&g| g > 0.0),
                "{}: descent must lower rejected log-probs (grad {gr:?})",
                kind.name()
            );
        }
    }

    #[test]
    fn stable_at_the_edges() {
        let device = Default::default();
        // p → 1: mean log-prob → 0⁻; log-odds and its gradient stay finite.
        let lp = Tensor::<Train, 1>::from_data(
            TensorData::new(vec![0.0f32, -1e-9, -1e-5, -0.3, -80.0], [5]),
            &device,
        )
        .require_grad();
        let side = Side::new(lp.clone(), &[1.0; 5], None);
        let odds = side.score(Score::LogOdds);
        let values: Vec<f32> = odds.clone().into_data().to_vec().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{values:?}");
        let want = |m: f64| m - (1.0 - m.exp()).ln();
        for (i, m) in [-1e-5f64, -0.3, -80.0].iter().enumerate() {
            let got = values[i + 2] as f64;
            assert!(
                (got - want(*m)).abs() < 1e-3 * want(*m).abs().max(1.0),
                "{m}: {got}"
            );
        }
        let grads = odds.sum().backward();
        let g: Vec<f32> = lp.grad(&grads).unwrap().to_data().to_vec().unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{g:?}");
        // log σ far in both tails.
        let x =
            Tensor::<Inner, 1>::from_data(TensorData::new(vec![-200.0f32, 200.0], [2]), &device);
        let y: Vec<f32> = log_sigmoid(x).into_data().to_vec().unwrap();
        assert!((y[0] + 200.0).abs() < 1e-3 && y[1].abs() < 1e-6, "{y:?}");
    }

    #[test]
    fn parameter_ranges_are_checked() {
        let bad_temperature = LossParams {
            temperature: 0.0,
            ..LossParams::default()
        };
        assert!(
            bad_temperature
                .validate()
                .unwrap_err()
                .contains("temperature")
        );
        let bad_smoothing = LossParams {
            label_smoothing: 0.5,
            ..LossParams::default()
        };
        assert!(
            bad_smoothing
                .validate()
                .unwrap_err()
                .contains("label_smoothing")
        );
        assert!(LossParams::default().validate().is_ok());
    }
}
