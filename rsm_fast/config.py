"""Run configuration: typed dataclasses, YAML presets, ``--set key=value`` overrides.

Precedence: dataclass defaults < preset YAML (``--preset``) < the preset's section for the run's
task < ``--config FILE`` < ``--set``. A preset's optional top-level ``tasks:`` mapping holds
per-task defaults keyed by ``task.name`` (``digits-ddim: {train: {batch_size: 32}}``): the run's
task is the last of preset, file and ``--set`` that names one, and its section applies on top of
the preset, so a file or ``--set`` still overrides it.
Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` with a one-line
message naming the offending field (and the file, when it came from one). Nothing touches the
run directory before the whole configuration has validated.

Values. A float field takes a finite number (NaN and +-inf are refused unless its help says
otherwise; none does today); a string that reads as a number is taken as one, because YAML 1.1
reads ``1e-3`` (no dot) as a string, on ``--set`` and in files alike. An integer field takes an
integer, or a float / numeric string whose value is exactly an integer (``1e3``, ``2.0``);
``1.5`` is refused. Every number has a range (:mod:`rsm_fast.config_checks`): integers are
bounded where the machine bounds them (``train.seed`` in [0, 2**63 - 1], ``train.threads`` <= the
CPU count, sizes <= 2**31 - 1), checked per field as it is read (so the message names the file),
then across fields by :func:`validate`.
"""
from __future__ import annotations

import dataclasses
import decimal
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

FORMS = ("pg", "ratio", "hinge")
REWEIGHTS = ("base", "tempflow", "tempflow_outer", "fair", "fair_guard", "guard", "pcpo")
ESTIMATORS = ("zo", "fo_terminal", "fo_current", "fo_lookahead", "forward")
GROUPED = ("zo", "forward")        # estimators whose advantages are centred per group of method.group_size samples
FP_LOSSES = ("nft", "awm")
FP_DECAYS = ("nft0", "nft1", "nft2", "awm", "awm_const")
FP_WEIGHTINGS = ("uniform", "t", "t**2", "huber", "ghuber")
SOLVERS = ("euler", "dpm2", "unipc")
RETURNS = ("hard", "soft")
BASELINES = ("mean", "loo", "none")
ADV_NORMS = ("none", "group", "global")
FO_WEIGHTS = ("kl", "native", "precision")
FO_GAMMAS = ("one", "alpha_bar", "sqrt_alpha_bar", "alpha_bar_next", "sqrt_alpha_bar_next", "discount")
FO_JACOBIANS = ("auto", "tweedie", "identity")
FO_MODELS = ("policy", "reference")


class ConfigError(ValueError):
    """A configuration problem; ``str(err)`` is a one-line message naming the field (line breaks
    in a value are shown escaped, so the message stays one line whatever the input held)."""

    def __str__(self) -> str:
        msg = super().__str__()
        return msg.replace("\r", "\\r").replace("\n", "\\n") if ("\n" in msg or "\r" in msg) else msg


@dataclass
class TaskConfig:
    name: str = field(default="toy2d", metadata={"help": "task: toy2d (the analytic 2-D task), digits-ddim, digits-flow, diffusers (task.model)"})
    model: str = field(default="sd15-tiny", metadata={"help": "diffusers task: local diffusers folder or named config (sd15-tiny, sd3-tiny, sd15-full, sd35m-full)"})
    prompts: str = field(default="", metadata={"help": "diffusers task: prompt file (.txt one per line, or .jsonl with 'prompt' + metadata); empty = a built-in list"})
    resolution: int = field(default=0, metadata={"help": "diffusers task: image size in pixels (0 = the model's default)"})
    cfg_scale: float = field(default=-1.0, metadata={"help": "classifier-free guidance scale (-1 = the task's default, 0 = off)"})
    condition: str = field(default="label", metadata={"help": "digits: 'label' (class-conditional, CFG) or 'none' (the null label, unconditional)"})
    noise_level: float = field(default=0.7, metadata={"help": "flow models: Flow-GRPO SDE noise level a (flow_grpo default 0.7); 0 (the ODE, nothing to train) is refused, else in [1e-6, 100]"})
    alpha: float = field(default=1.0, metadata={"help": "KL weight of the soft objective; p* ∝ p_ref exp(r/alpha)"})
    num_steps: int = field(default=50, metadata={"help": "sampling steps (toy: DDIM over 500 train steps)"})
    eta: float = field(default=1.0, metadata={"help": "DDIM eta (1 = DDPM posterior noise); 0 (deterministic, nothing to train) is refused, else in [1e-6, 100]"})
    reward: str = field(default="", metadata={"help": "reward spec (see rsm_fast.rewards): '' = the task's default (toy2d: linear, digits: digit log-prob, diffusers: jpeg)"})
    eval_samples: int = field(default=0, metadata={"help": "fresh samples for the final evaluation (0 = the task's default: toy2d 8192, digits 1024, diffusers 16)"})
    reward_timeout: float = field(default=600.0, metadata={"help": "seconds one reward call (one batch) may take: the deadline of an in-process reward and the HTTP client's total across reads and retries; past it the call is a reward fault (train.reward_faults)"})
    reward_retries: int = field(default=2, metadata={"help": "HTTP reward: retries of a transient fault (timeout, refused, 5xx, 429) within task.reward_timeout"})
    reward_max_mb: float = field(default=64.0, metadata={"help": "HTTP reward: the largest response body read, in MiB; a larger one is a reward fault"})
    reward_auth: str = field(default="", metadata={"help": "HTTP reward: Authorization header value (e.g. 'Bearer <token>'); never written to config.yaml, checkpoints or errors (prefer task.reward_auth_env)"})
    reward_auth_env: str = field(default="RSM_FAST_REWARD_AUTH", metadata={"help": "HTTP reward: environment variable read for the Authorization header when task.reward_auth is empty"})
    reward_backend: str = field(default="eager", metadata={"help": "reward models (aesthetic, pickscore, hps): 'eager' (torch) or 'tensorrt' (the image encoder compiled with torch-tensorrt on a CUDA device; no gradients, so zeroth-order estimators only); without torch_tensorrt or CUDA: one line on stderr and eager"})
    text_cache: str = field(default="", metadata={"help": "diffusers: folder of the on-disk text-embedding cache; at start every prompt (and '') is encoded once, loading the text encoders only if one is not cached, then they are freed; folders may be shared by concurrent runs ('' = $RSM_FAST_CACHE/text or ~/.cache/rsm_fast/text; 'off' = no cache, encoders stay loaded and encode every epoch)"})
    t5: bool = field(default=True, metadata={"help": "SD3: load the T5 text encoder (false: CLIP only, T5 never loaded, zero T5 rows as diffusers' pipeline without text_encoder_3); SD1.5 has no T5"})
    vae_slicing: bool = field(default=False, metadata={"help": "diffusers: VAE enable_slicing, decode the batch one image at a time (less peak memory, same images)"})
    vae_tiling: bool = field(default=False, metadata={"help": "diffusers: VAE enable_tiling, decode in overlapping tiles (less peak memory above the VAE's sample_size; images differ slightly at tile seams)"})
    offload: str = field(default="", metadata={"help": "diffusers: '' = every part on train.device; 'cpu' = frozen parts (VAE, text encoders, a full fine-tune's reference) live in CPU memory and visit train.device only while used (a host-device copy per use; no effect on a CPU device)"})


@dataclass
class PolicyConfig:
    hidden: int = field(default=128, metadata={"help": "width of the residual MLP"})
    layers: int = field(default=2, metadata={"help": "hidden layers of the residual MLP"})
    emb_dim: int = field(default=32, metadata={"help": "time-embedding width"})
    lora_rank: int = field(default=8, metadata={"help": "image models: LoRA rank (0 = full fine-tuning)"})
    lora_alpha: float = field(default=0.0, metadata={"help": "image models: LoRA alpha (0 = rank, scale 1)"})
    lora_targets: str = field(default="to_q,to_k,to_v,to_out.0", metadata={"help": "image models: LoRA target modules (comma-separated)"})
    train_text_encoder: bool = field(default=False, metadata={"help": "diffusers: also train a LoRA on the CLIP text encoders (SD3: CLIP-L and CLIP-G, T5 stays frozen and cached), same rank and alpha, as diffusers' --train_text_encoder; prompts are re-encoded under grad in every training forward, the reference runs with every LoRA off"})
    text_lora_targets: str = field(default="q_proj,k_proj,v_proj,out_proj", metadata={"help": "diffusers, train_text_encoder: LoRA target modules of the text encoders (diffusers' train_dreambooth_lora scripts' text_lora_config)"})
    dtype: str = field(default="fp32", metadata={"help": "image models (digits, diffusers): weight dtype fp32 / bf16 / fp16, loaded in it (log-prob, ratio and loss math stay fp32; a LoRA's own weights and the VAE stay fp32; a full fine-tune trains and keeps AdamW state in it; fp16 has no loss scaling: prefer bf16)"})
    autocast: str = field(default="", metadata={"help": "image models (digits, diffusers): run every denoiser forward (policy and reference) under torch.autocast in this dtype ('' = off, bf16, fp16; CPU takes both); weights keep policy.dtype"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "image models (digits, diffusers): diffusers' per-block activation checkpointing of the trained model (less memory, ~1.3x the training step's compute)"})
    attention: str = field(default="sdpa", metadata={"help": "image models (digits, diffusers): attention kernels, 'sdpa' (torch scaled_dot_product_attention) or 'xformers' (needs the xformers package; checked before a model loads)"})


@dataclass
class MethodConfig:
    estimator: str = field(default="zo", metadata={"help": f"guidance estimator {ESTIMATORS}"})
    returns: str = field(default="hard", metadata={"help": "zo: 'hard' reward or 'soft' entropy-augmented return"})
    baseline: str = field(default="mean", metadata={"help": f"reward centering {BASELINES}"})
    adv_norm: str = field(default="group", metadata={"help": f"advantage scaling {ADV_NORMS}"})
    adv_clip: float = field(default=5.0, metadata={"help": "clip advantages to ±this (0 = off); flow_grpo adv_clip_max=5"})
    group_size: int = field(default=16, metadata={"help": "trajectories per advantage group (0 = the whole batch is one group)"})
    surrogate: str = field(default="hinge", metadata={"help": f"zo surrogate form {FORMS}"})
    reweight: str = field(default="base", metadata={"help": f"timestep reweighting {REWEIGHTS}"})
    clip_eps: float = field(default=1e-4, metadata={"help": "trust-region clip (ratio form: 1±eps; hinge: eps|A|)"})
    kl_coef: float = field(default=0.0, metadata={"help": "weight of KL(pi_theta || pi_ref) per step"})
    kl_dt_weight: bool = field(default=False, metadata={"help": "multiply the KL by dt (Flow-GRPO heuristic denominator)"})
    fo_weight: str = field(default="kl", metadata={"help": "fo loss weight C1 (native space, times fo_c1_scale): 'kl' = 0.5 omega^2 |df|^2 (score space b^2/(2 Sigma)), 'native' = 0.5 |df|^2 (score 1/(2 lambda^2)), 'precision' = (omega^2/Sigma) |df|^2 (score b^2/Sigma^2: |(mu - mu_target)/Sigma|^2, Residual nabla-DB)"})
    fo_c1_scale: float = field(default=1.0, metadata={"help": "fo: multiplies C1 (e.g. alpha of C1 = alpha b^2/(2 Sigma), SQDF's KL weight; 2 with fo_weight=native = a plain native MSE)"})
    fo_gamma: str = field(default="one", metadata={"help": "fo temporal weight gamma(t): 'one', 'alpha_bar' / 'sqrt_alpha_bar' (alpha_t^2 / alpha_t of the current state; RF: (1-t)^2 / 1-t), 'alpha_bar_next' / 'sqrt_alpha_bar_next' (of the next state t', nabla-DB 'squared'/'sqrt'), 'discount' (fo_discount ** steps remaining after the transition, SQDF)"})
    fo_gamma_native: bool = field(default=False, metadata={"help": "fo: multiply gamma by |lambda(t)|, i.e. the guidance is given per unit of native output (VGG-Flow: v_tgt = v_ref - eta K grad r)"})
    fo_discount: float = field(default=0.9, metadata={"help": "fo_gamma=discount: the per-step discount (SQDF sqdf_gamma = 0.9)"})
    fo_reward_scale: float = field(default=1.0, metadata={"help": "K in Psi = K (Sigma/b) grad r (lookahead, terminal) or K grad r (current state); K = 1/alpha of RSM"})
    fo_jacobian: str = field(default="auto", metadata={"help": "fo_current / fo_lookahead: d x0_hat/dx with the model output held fixed: 'tweedie' (1/alpha_t for eps, identity for v), 'identity' (grad r at x0_hat, VGG-Flow), 'auto' = identity for fo_current, tweedie for fo_lookahead"})
    fo_value: str = field(default="tweedie", metadata={"help": "fo_lookahead: the value whose gradient at the sampled next state x' is the guidance: 'tweedie' r(x0_hat(x')) (SQDF, nabla-DB), 'path' the return of the rest of the record's own sampled path, differentiated through the policy's sampler with its noise held fixed (the soft return r - alpha sum_{j>i} KL_j with method.returns=soft; consistent for Psi*; K = 1 sde plans training every step); 'exact' the 2-D task's closed-form Psi* at the record's state, a ceiling for diagnostics, not a method"})
    fo_path_rule: str = field(default="next", metadata={"help": "method.fo_value=path: where along each recorded step the pathwise soft-return gradient is read: 'next' grad_{x'} R_i at the sampled next state with the lookahead scale Psi = K (Sigma/b) g (the gradient of J on the sampler's Gaussian steps; lands short of p* on the 2-D task); 'current' grad_x of the return from the record's own state, its step's KL included, with the current-state scale Psi = K g (lands past p*); 'trapezoid' the mean of the two Psi (centred on p* over seeds, with the same seed spread: bench/results/default_run_toy2d_2026-12-06.md); 'current' and 'trapezoid' cost one more sweep step (2 evaluations per path)"})
    fo_lookahead_model: str = field(default="policy", metadata={"help": "fo_lookahead: whose output at the next state x' gives x0_hat(x'): the rollout 'policy' (nabla-DB) or the frozen 'reference' (SQDF without its consistency model); one extra model call per record"})
    fo_grad_chunk: int = field(default=0, metadata={"help": "fo_terminal / fo_current / fo_lookahead: rows per decode + reward backward (fo_terminal and fo_value=path: final samples; else records), each call keeping every layer of the decode and the reward model per row until its backward; also the rows per policy call of the fo_value=path sweep (0 = rollout.chunk_size; 0 there = all)"})
    trust_c2: float = field(default=0.0, metadata={"help": "fo trust region C2 (relative, spec §3.2)"})
    trust_eps: float = field(default=0.0, metadata={"help": "fo: c_reg of an eps-space MSE to the rollout policy, c_reg mean|eps_theta - eps_old|^2 (nabla-DB unet_reg_scale); relative C2 = c_reg sigma_t^2 / C1 in score space"})
    pcpo_target: str = field(default="dt", metadata={"help": "reweight=pcpo: target native weight omega' per step: 'dt' = zeta dt with zeta = sum(omega)/sum(dt) over the noisy steps (flow form), 'const' = mean omega (diffusion form)"})
    step_weight: str = field(default="equal", metadata={"help": "'equal': each trained step's records weigh Kbar/K_i so every step contributes its mean (RSM-code); 'records': a plain mean over records"})
    fp_loss: str = field(default="nft", metadata={"help": f"estimator=forward: {FP_LOSSES}, DiffusionNFT's positive / implicit-negative x0 regression or AWM's clipped ratio on the flow-matching likelihood (rsm_fast/forward_family.py)"})
    fp_beta: float = field(default=1.0, metadata={"help": "forward, nft: the beta of v+ = beta v + (1 - beta) v_old (DiffusionNFT config.beta: 1.0 GenEval, 0.1 OCR)"})
    fp_kl: float = field(default=1e-4, metadata={"help": "forward: weight of mean |v - v_ref|^2 (DiffusionNFT train.beta 1e-4, AWM beta 1e-3)"})
    fp_ema_kl: float = field(default=0.0, metadata={"help": "forward, awm: weight of mean |v - v_ema|^2, the KL-to-EMA trust region (AWM ema_beta 1.0)"})
    fp_weighting: str = field(default="ghuber", metadata={"help": f"forward, awm: likelihood weighting {FP_WEIGHTINGS} (AWM GenEval: ghuber)"})
    fp_power: float = field(default=0.25, metadata={"help": "forward, awm: the ghuber power p"})
    fp_clip: float = field(default=1.0, metadata={"help": "forward, awm: ratio clip range c (ratio in [1 - c, 1 + c])"})
    fp_timesteps: int = field(default=6, metadata={"help": "forward, awm: training timesteps per sample, one per stratum of the first fp_fraction of the steps (discrete_wo_init)"})
    fp_fraction: float = field(default=0.99, metadata={"help": "forward: nft trains a random floor(fraction N) of the N steps per sample (0.99); awm stratifies its timesteps over the first fraction (0.9)"})
    fp_decay: str = field(default="nft1", metadata={"help": f"forward: schedule of the old (nft) / EMA (awm) weights {FP_DECAYS}: old <- d old + (1 - d) theta after every epoch"})


@dataclass
class RolloutConfig:
    plan: str = field(default="sde", metadata={"help": "rollout plan: 'sde' (K = 1 trajectories), 'branch' (ODE trunk + one-step SDE children), 'tree' (recursive SDE tree)"})
    k: list = field(default_factory=list, metadata={"help": "branch/tree: children per step, one int per step, e.g. [4,4,0,...]"})
    profile: str = field(default="", metadata={"help": "branch/tree: K per step as a rule instead of rollout.k: const:K, every:S:K, at:I,J:K, first:F:K or a released SD3.5 name (rsm_fast.engine.profiles)"})
    window: int = field(default=0, metadata={"help": "sde plans: MixGRPO sliding window, the number of consecutive SDE (and trained) steps; ODE elsewhere (0 = off)"})
    window_every: int = field(default=25, metadata={"help": "MixGRPO: epochs between window shifts (its iters_per_group = 25)"})
    window_stride: int = field(default=1, metadata={"help": "MixGRPO: steps the window moves per shift (its prog_overlap_step = 1); it wraps to step 0 past the trained range"})
    truncate: int = field(default=-1, metadata={"help": "branch plans: a child takes this many ODE steps, then jumps to its Tweedie x0_hat (issue 20 truncated branches; -1 = every child runs to the end)"})
    chunk_size: int = field(default=0, metadata={"help": "rows per model call (0 = all rows of a step in one call)"})
    graphs: bool = field(default=False, metadata={"help": "replay the model from CUDA graphs (CUDA only; off until verified on a GPU)"})
    solver: str = field(default="dpm2", metadata={"help": f"method.estimator=forward: the deterministic rollout solver {SOLVERS} (rsm_fast/solvers.py; dpm2 = DiffusionNFT's)"})
    waves: int = field(default=1, metadata={"help": "split each epoch's groups into this many sequential rollouts; a wave's reward is scored on a worker thread while the next wave samples (1 = no overlap)"})
    allocator: str = field(default="", metadata={"help": "branch plans: '' = the static profile, 'online' = re-allocate K per step every epoch from sibling variance, clip fraction and cost (rsm_fast.budget, spec §7.3)"})
    alloc_units: str = field(default="branches", metadata={"help": "allocator: what a branch costs: 'branches' (1 each; paper), 'nfe' (model evaluations, as counted by the trainer) or 'seconds' (measured on this machine)"})
    alloc_budget: float = field(default=0.0, metadata={"help": "allocator: budget per trunk in branches or NFE, per epoch in seconds (0 = the cost of the starting profile)"})
    alloc_rule: str = field(default="sqrt", metadata={"help": "allocator: 'sqrt' K ~ sqrt(w v / c) (min variance; reproduces the released highsnr2), 'linear' K ~ w v (equal variance)"})
    alloc_k_min: int = field(default=2, metadata={"help": "allocator: smallest non-zero K; below it a step is deactivated. 2 (default): every branching step is centred on >= 2 siblings; 1: a step may keep a single branch, centred on its group at that step as in TempFlow's K = 1 original"})
    alloc_k_max: int = field(default=0, metadata={"help": "allocator: largest K (0 = no cap)"})
    alloc_every: int = field(default=1, metadata={"help": "allocator: epochs between re-allocations"})
    alloc_max_step: int = field(default=2, metadata={"help": "allocator: hysteresis, the most a K moves per re-allocation (0 = no limit)"})
    alloc_patience: int = field(default=5, metadata={"help": "allocator: epochs a deactivated step stays off before it may be probed again"})
    alloc_clip_tau: float = field(default=0.5, metadata={"help": "allocator: deactivate a step whose clip fraction (EMA, last inner update) exceeds this"})
    alloc_snr_min: float = field(default=0.0, metadata={"help": "allocator: deactivate a step whose estimated SNR at K_max is below this (0 = off)"})
    alloc_ema: float = field(default=0.9, metadata={"help": "allocator: EMA factor of the per-step variance / clip statistics, in [0, 1)"})
    alloc_psi_units: str = field(default="score", metadata={"help": "allocator: units of the per-branch guidance psi = scale A z: 'score' (sigma/b; v ~ Sigma/b^2, the paper's) or 'native' (omega)"})
    alloc_objective: str = field(default="budget", metadata={"help": "allocator: 'budget' = the least estimator variance sum w v / K at the budget (spec §7.3), 'variance' = the least cost that keeps the variance the starting profile would have under the current estimates (the budget is then a cap)"})
    alloc_weights: str = field(default="uniform", metadata={"help": "allocator: step weights w_i of K ~ sqrt(w v / c): 'uniform' (w = 1; the paper's profiles) or 'influence' (w = the loss's squared force on the model output per unit of psi, times 1 - clip fraction: w v is then the per-branch variance of the gradient the step feeds the model)"})


@dataclass
class TrainConfig:
    epochs: int = field(default=300, metadata={"help": "rollout/update epochs"})
    batch_size: int = field(default=512, metadata={"help": "trajectories sampled per epoch"})
    inner_updates: int = field(default=1, metadata={"help": "optimizer steps per epoch on the same rollout (>1: off-policy, trust region active)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    lr_schedule: str = field(default="constant", metadata={"help": "'constant' or 'cosine' (decays to lr_final_frac * lr)"})
    lr_final_frac: float = field(default=0.1, metadata={"help": "cosine: final learning rate as a fraction of lr"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip (0 = off)"})
    timestep_fraction: float = field(default=1.0, metadata={"help": "train the first int(fraction x noisy steps) stochastic steps, at least one (flow_grpo timestep_fraction: 0.99 of 10 steps trains 9)"})
    seed: int = field(default=0, metadata={"help": "seed for weights, noise and evaluation, in [0, 2**63 - 1]"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu, cuda or cuda:N (checked against this machine before anything is written)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch default; at most os.cpu_count() of this machine)"})
    eval_before: bool = field(default=False, metadata={"help": "also evaluate the policy before training (summary: 'before')"})
    reward_faults: str = field(default="error", metadata={"help": "a reward fault (NaN, wrong shape, exception, server timeout): 'error' stops the run, 'skip' drops the epoch's update"})
    loss_impl: str = field(default="fused", metadata={"help": "'fused' (rsm_fast.ops custom ops) or 'reference' (plain torch oracle)"})
    compile: str = field(default="off", metadata={"help": "torch.compile the policy inside the training step (rollout and evaluation stay eager): 'off', 'regional' (one graph per model-block shape: channels, spatial sizes and parameters static, the row dim dynamic), 'full' (the whole policy forward); on CPU 1.1-1.2x faster after a 1-1.5 min UNet compile (bench/results/compile_cpu_*.md); quote 'off' in YAML / --set (a bare off reads as false); rsm_fast/train_step.py"})
    grad_accum: int = field(default=1, metadata={"help": "split each inner update's rows into this many micro-batches (gradient accumulation; same gradient, less memory)"})
    fused_epoch: bool = field(default=False, metadata={"help": "keep the rollout's forward graphs (policy and reference) for the epoch: the first-order path sweep and the first inner update differentiate them instead of running the model again (one policy forward per record instead of two or three; the same numbers on CPU); memory: every record's activations at once; needs an sde plan without rollout.window, graphs or waves, grad_accum 1, one process; rsm_fast/fused_path.py"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of the trained weights, used for evaluation and export (0 = off; RSM-code SD3.5: 0.9)"})
    ema_every: int = field(default=1, metadata={"help": "optimizer steps between EMA updates (RSM-code SD3.5: 8)"})
    checkpoint_every: int = field(default=10, metadata={"help": "epochs between checkpoints in <out>/checkpoints (0 = only at the end and at a stop); --resume continues from the latest"})
    keep_checkpoints: int = field(default=2, metadata={"help": "periodic checkpoints kept (the oldest are deleted)"})
    eval_every: int = field(default=0, metadata={"help": "epochs between held-out evaluations during training, logged in the epoch's record under 'eval' (0 = only the final one)"})
    optimizer: str = field(default="adamw", metadata={"help": "'adamw' (torch; states in the trained weights' dtype: 8 B per fp32 parameter) or 'adamw8bit' (bitsandbytes AdamW8bit, ~2 B per parameter; needs bitsandbytes and a CUDA device)"})
    tf32: bool = field(default=True, metadata={"help": "CUDA: TF32 matmuls and convolutions (flow_grpo's setting); no effect on CPU"})
    parallel: str = field(default="ddp", metadata={"help": "under torchrun: 'ddp' (every rank holds the weights; LoRA and small policies) or 'fsdp' (FSDP2 fully_shard per model block; full fine-tuning)"})
    dist_backend: str = field(default="", metadata={"help": "under torchrun: process-group backend ('' = nccl on CUDA, gloo on CPU)"})
    dist_timeout: float = field(default=600.0, metadata={"help": "under torchrun: seconds a collective may wait for the other ranks; past it every rank exits with one line naming the rank and the phase"})


@dataclass
class RunConfig:
    preset: str = "custom"
    description: str = ""
    task: TaskConfig = field(default_factory=TaskConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_CHOICES = {
    "method.estimator": ESTIMATORS, "method.fp_loss": FP_LOSSES, "method.fp_decay": FP_DECAYS,
    "method.fp_weighting": FP_WEIGHTINGS, "rollout.solver": SOLVERS, "method.returns": RETURNS, "method.baseline": BASELINES,
    "method.adv_norm": ADV_NORMS, "method.surrogate": FORMS, "method.reweight": REWEIGHTS,
    "method.fo_weight": FO_WEIGHTS, "method.fo_gamma": FO_GAMMAS,
    "method.fo_jacobian": FO_JACOBIANS, "method.fo_lookahead_model": FO_MODELS, "method.fo_value": ("tweedie", "path", "exact"),
    "method.fo_path_rule": ("next", "current", "trapezoid"),
    "task.name": ("toy2d", "digits-ddim", "digits-flow", "diffusers"),
    "train.lr_schedule": ("constant", "cosine"), "train.loss_impl": ("fused", "reference"),
    "rollout.plan": ("sde", "branch", "tree"), "train.reward_faults": ("error", "skip"),
    "task.condition": ("label", "none"), "method.pcpo_target": ("dt", "const"),
    "method.step_weight": ("equal", "records"), "train.compile": ("off", "regional", "full"),
    "rollout.allocator": ("", "online"), "rollout.alloc_units": ("branches", "nfe", "seconds"),
    "rollout.alloc_rule": ("sqrt", "linear"), "rollout.alloc_psi_units": ("score", "native"),
    "rollout.alloc_weights": ("uniform", "influence"), "rollout.alloc_objective": ("budget", "variance"),
    "policy.dtype": ("fp32", "bf16", "fp16"), "policy.autocast": ("", "bf16", "fp16"),
    "policy.attention": ("sdpa", "xformers"), "task.offload": ("", "cpu"), "task.reward_backend": ("eager", "tensorrt"),
    "train.optimizer": ("adamw", "adamw8bit"), "train.parallel": ("ddp", "fsdp"),
    "train.dist_backend": ("", "gloo", "nccl"),
}
# ----------------------------------------------------------------------------------------------
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
INT_LIMIT = 2**63           # no integer field holds more than int64 (most hold far less: config_checks)


def _number_text(value: Any) -> bool:
    return isinstance(value, str) and _NUMBER.fullmatch(value.strip()) is not None


def _as_int(path: str, value: Any) -> int:
    """An int, or a float / numeric string whose value is exactly an integer (``1e3``, ``2.0``)."""
    if isinstance(value, bool):
        raise ConfigError(f"config field '{path}' must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if _number_text(value):
        d = decimal.Decimal(value.strip())
        if d.adjusted() >= 19:          # >= 1e19: never build the int of '1e999999999'
            raise ConfigError(f"config field '{path}' is out of range, got {value!r}")
        if d.adjusted() >= 0 and d == d.to_integral_value():
            return int(d)
        if d.is_zero():
            return 0
    raise ConfigError(f"config field '{path}' must be an integer, got {value!r}")


def _coerce(path: str, value: Any, typ: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field '{path}' must be true/false, got {value!r}")
    if typ is int:
        return _as_int(path, value)
    if typ is float:
        if isinstance(value, bool) or not (isinstance(value, (int, float)) or _number_text(value)):
            raise ConfigError(f"config field '{path}' must be a number, got {value!r}")
        try:
            out = float(value.strip() if isinstance(value, str) else value)
        except OverflowError:       # an int beyond float range
            raise ConfigError(f"config field '{path}' is out of range, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"config field '{path}' must be a finite number, got {value!r}")
        return out
    if typ is list:  # lists of non-negative ints (branching profiles)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{path}' must be a list of integers, e.g. [4, 4, 0], got {value!r}")
        try:
            return [_as_int(path, v) for v in value]
        except ConfigError:
            raise ConfigError(f"config field '{path}' must be a list of integers, e.g. [4, 4, 0], got {value!r}") from None
    if typ is str:
        if isinstance(value, bool):      # YAML reads a bare off/on/no/yes as a bool: train.compile=off
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"config field '{path}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config field '{path}' has unsupported type {typ}")


def apply_mapping(cfg: Any, data: dict, prefix: str = "", source: str = "") -> None:
    """Merge a nested mapping into dataclass ``cfg`` in place, rejecting unknown keys."""
    where = f" (in {source})" if source else ""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping{where}, "
                          f"got {type(data).__name__}")
    types_ = _field_types(type(cfg))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in types_:
            raise ConfigError(f"unknown config key '{path}'{where}; allowed: {', '.join(sorted(types_))}")
        typ = types_[key]
        if dataclasses.is_dataclass(typ):
            apply_mapping(getattr(cfg, key), value, f"{path}.", source)
        else:
            from .config_checks import check_field
            try:
                value = _coerce(path, value, typ)
                check_field(path, value)        # this field's own range, while the file is known
            except ConfigError as e:
                raise ConfigError(f"{e}{where}") from None
            setattr(cfg, key, value)


def parse_set(expr: str) -> tuple[str, Any]:
    """``"method.kl_coef=0.5"`` -> ``("method.kl_coef", 0.5)`` (value parsed as YAML scalar)."""
    if "=" not in expr:
        raise ConfigError(f"--set expects key=value, got {expr!r}")
    key, raw = expr.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):     # not YAML (or nested past the parser): the text itself
        value = raw
    return key, value


def set_dotted(cfg: RunConfig, key: str, value: Any, source: str = "--set") -> None:
    parts = key.split(".")
    nested: dict = {}
    cur = nested
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    apply_mapping(cfg, nested, source=source)


MAX_CONFIG_BYTES = 16 * 2**20


def load_yaml(path: str | Path) -> dict:
    """A config file's top-level mapping. One-line :class:`ConfigError` naming the file when it is
    missing, not a regular file (a directory, a FIFO, a device), unreadable, over 16 MiB, not UTF-8
    or not YAML."""
    p = Path(path)
    try:
        st = p.stat()
        if not p.is_file():
            raise ConfigError(f"config file '{p}' is not a regular file")
        if st.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file '{p}' is {st.st_size:,} bytes; a config holds at most {MAX_CONFIG_BYTES:,}")
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{p}': {e.strerror or e}") from None
    except ValueError as e:      # a path the OS cannot take (NUL byte)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"cannot read config file {str(p)!r}: {e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid YAML"
        raise ConfigError(f"config file '{p}' is not valid YAML: {first}") from None
    except RecursionError:
        raise ConfigError(f"config file '{p}' is not valid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at top level, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# presets
# ----------------------------------------------------------------------------------------------
def preset_names() -> list[str]:
    from . import preset_files

    return preset_files.names()


def preset_data(name: str) -> dict:
    """Preset ``name``'s mapping, its ``extends:`` chain resolved (:mod:`rsm_fast.preset_files`)."""
    from . import preset_files

    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(names)}")
    return preset_files.resolve(name)


def split_preset(name: str, data: dict) -> tuple[dict, dict]:
    """``(preset values, {task name: per-task section})`` of a preset's YAML mapping."""
    data = dict(data)
    tasks = data.pop("tasks", None) or {}
    allowed = _CHOICES["task.name"]
    if not isinstance(tasks, dict):
        raise ConfigError(f"preset {name}: 'tasks' must map task names to config sections, got {type(tasks).__name__}")
    for key, section in tasks.items():
        if key not in allowed:
            raise ConfigError(f"preset {name}: 'tasks.{key}' is not a task name; allowed: {', '.join(allowed)}")
        if not isinstance(section, dict) or "tasks" in section:
            raise ConfigError(f"preset {name}: 'tasks.{key}' must be a config mapping (no nested 'tasks')")
    return data, tasks


def _run_task(cfg: RunConfig, file_data: dict | None, overrides) -> str:
    """The task the run will have: the last of preset, config file and ``--set`` that names one."""
    name = cfg.task.name
    task = (file_data or {}).get("task")
    if isinstance(task, dict) and "name" in task:
        name = task["name"]
    for expr in overrides:
        key, value = parse_set(expr)
        if key == "task.name":
            name = value
    return name if isinstance(name, str) else ""      # a bad value is refused by the field's own check


def build_config(preset: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> RunConfig:
    cfg = RunConfig()
    file_data = load_yaml(config_file) if config_file is not None else None
    if preset is not None:
        values, per_task = split_preset(preset, preset_data(preset))
        apply_mapping(cfg, values, source=f"preset {preset}")
        task = _run_task(cfg, file_data, overrides)
        if task in per_task:
            apply_mapping(cfg, per_task[task], source=f"preset {preset}, tasks.{task}")
        cfg.preset = preset
    if file_data is not None:
        apply_mapping(cfg, file_data, source=str(config_file))
    for expr in overrides:
        set_dotted(cfg, *parse_set(expr))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every field's range, then the checks across fields (:mod:`rsm_fast.config_checks`); raises a
    one-line :class:`ConfigError` naming the field. Reads no file and writes nothing."""
    from .config_checks import validate_config

    validate_config(cfg)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def describe_fields() -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every leaf, for ``--help``."""
    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            typ = _field_types(cls)[f.name]
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{prefix}{f.name}.")
            elif prefix:
                default = f.default if f.default is not dataclasses.MISSING else None
                out.append((f"{prefix}{f.name}", f.metadata.get("help", ""), default))

    walk(RunConfig, "")
    return out

