"""Structured-config dataclasses: the schema behind every YAML in ``configs/``.

Precedence is CLI > YAML > these defaults (Hydra merges the YAML and the command line
onto the schema). The schema is *closed*: a key that is not declared here is an error
that names the key, except under ``model.optim`` / ``model.optim.sched`` whose keys
depend on the chosen optimizer/scheduler and are checked against that class's
parameters when it is built (see ``megatron_ext.training.optim``). The model configs (``ModelConfig``,
``EncoderDecoderModelConfig``) check their architecture keys when constructed (``config.model_validation``); a
config composed by Hydra/OmegaConf is checked by ``config.loader.check_config`` instead. ``model.optim`` has no defaults of its
own to merge under the user's: one that names no optimizer (no ``name``) is laid over :func:`default_optim`, one
that names an optimizer is taken as given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from megatron_ext.config.model_validation import check_encoder_decoder_config, check_gpt_model_config


@dataclass
class TrainerConfig:
    devices: int = 1  # processes per node
    num_nodes: int = 1
    accelerator: str = "auto"  # auto | cpu | gpu
    precision: str = "32"  # 32 | bf16 | 16 (also accepts bf16-mixed / 16-mixed)
    max_steps: int = 100  # -1 = no step limit (needs max_epochs); with both set the first reached stops
    # passes over the train split (steps per epoch = one epoch's samples // global_batch_size); null = max_steps only
    max_epochs: Optional[int] = None
    # int N: validate every N optimizer steps (0 = never); float in (0, 1]: every that fraction of an epoch
    val_check_interval: Any = 50
    # int: global batches per validation (of each validation dataset); float in [0, 1]: that fraction of the split
    limit_val_batches: Any = 4
    # global batches of each test dataset, evaluated once after training (and in evaluation-only runs); null = as
    # limit_val_batches, 0 = off; float in [0, 1]: that fraction of the test split
    limit_test_batches: Any = None
    # null; int: 0 = evaluation only (needs model.ckpt_path), N = at most N steps in this invocation; float in
    # [0, 1]: 0.0 = evaluation only, else each epoch is that fraction of its steps (needs max_epochs)
    limit_train_batches: Any = None
    # true / N: N train steps, validation on N global batches, no checkpoints, no loggers but the console; null
    # (default, so NeMo's +trainer.fast_dev_run=true works) / false / 0: off
    fast_dev_run: Any = None
    log_every_n_steps: int = 10
    accumulate_grad_batches: Optional[int] = None  # derived from batch sizes; if set, must agree
    gradient_clip_val: float = 1.0  # 0 disables clipping
    seed: int = 1234
    dist_timeout_minutes: float = 10.0
    deterministic: bool = False
    # glibc malloc keeps freed host memory for reuse (no page faults on every new tensor); null = on for CPU runs
    reuse_host_memory: Optional[bool] = None
    # a step whose loss or grad norm is non-finite (or a loss spike): stop the run | skip the step on every rank
    nan_policy: str = "stop"
    max_consecutive_skips: int = 5  # more skipped steps in a row than this stop the run (nan_policy=skip)
    loss_spike_factor: Optional[float] = None  # a loss above factor x the running mean is bad (null = off)
    loss_spike_window: int = 100  # good steps in that running mean; no spike check until it is full
    skip_steps: List[Any] = field(default_factory=list)  # steps whose batches are skipped unread: [5, "100-120"]
    # self-launch (trainer.devices>1 or this key>0, no launcher): restart all processes after a failure up to this
    # many times, resuming from the latest checkpoint (not after bad input, exit 2, nor a preemption, exit 75)
    max_restarts: int = 0
    # a step (the train step, its loss sync and logging; not validation or checkpoint writing) running longer makes
    # every rank dump its stacks to <run_dir>/stacks/ and the job exit 4; null = off
    step_timeout_minutes: Optional[float] = None
    # all-gather each rank's compute time every N steps (train/step_time_min, _max, _slowest_rank); 0 = off,
    # null = 10 where it can be measured (no pipeline engine, ZeRO < 3), else off
    straggler_every_n_steps: Optional[int] = None
    # warn when a rank computes more than this fraction longer than the median of the others (median over a window)
    straggler_threshold: float = 0.2
    # measure the peak memory and the bytes passed to collectives per step by kind on every rank over the first
    # plan_check_steps steps (from the second on) and log them as plan/ metrics (megatron_ext/planning/check.py)
    plan_check: bool = False
    plan_check_steps: int = 3


@dataclass
class CheckpointCallbackParams:
    every_n_train_steps: int = 100  # 0 = only at the end of training
    save_last: bool = True  # also save when training ends
    save_top_k: int = -1  # keep this many newest checkpoints (-1 = keep all); with monitor: the k best + the newest
    # a validation metric (val/loss; NeMo's val_loss is accepted): checkpoints are also written at each validation and
    # save_top_k keeps the best by it (plus the newest, for resume); null = save_top_k keeps the newest
    monitor: Optional[str] = None
    mode: str = "min"  # min | max: which way the monitored metric improves
    # a name for each kept best checkpoint, e.g. "{val_loss:.2f}-{step}" -> checkpoints/val_loss=2.31-step=40, a
    # symlink to its step_N directory (fields: step, epoch, consumed_samples, val_<metric>); null = none
    filename: Optional[str] = None
    # also write the layout-free state (step_N/layout_free: fp32 weights + optimizer state by global parameter name)
    # that lets a resume change TP / PP / DP / ZeRO; false: the checkpoint resumes only under its own layout
    save_layout_free: bool = True
    # before a checkpoint is loaded (resume, model.ckpt_path) its files' sha256 are checked against its manifest
    # (shared among the ranks); false checks sizes and zip directories only (README "Checkpoints")
    verify_checksums: bool = True
    # write checkpoints in the background: the step pays for a host copy of the state, one save in flight
    async_save: bool = False


@dataclass
class EarlyStoppingCallbackParams:
    monitor: str = "val_loss"  # a validation metric (val/loss or NeMo's val_loss)
    mode: str = "min"  # min | max
    patience: int = 10  # stop after this many validations in a row without improvement
    min_delta: float = 0.001  # an improvement is a change by more than this


@dataclass
class WandbLoggerKwargs:
    project: str = "megatron_ext"
    name: Optional[str] = None
    offline: bool = True
    entity: Optional[str] = None


@dataclass
class ExpManagerConfig:
    exp_dir: str = "experiments"
    name: str = "megatron_gpt"
    version: Optional[str] = None  # default: a timestamp
    create_tensorboard_logger: bool = True
    create_wandb_logger: bool = False
    wandb_logger_kwargs: WandbLoggerKwargs = field(default_factory=WandbLoggerKwargs)
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = field(default_factory=CheckpointCallbackParams)
    # stop training when the monitored validation metric stops improving (NeMo's / Lightning's EarlyStopping)
    create_early_stopping_callback: bool = False
    early_stopping_callback_params: EarlyStoppingCallbackParams = field(default_factory=EarlyStoppingCallbackParams)
    resume_if_exists: bool = False
    resume_ignore_no_checkpoint: bool = True
    # a checkpoint of another run (a step directory, a checkpoints directory or a run directory: its latest) whose
    # full state -- weights, optimizer, scheduler, step, data position -- starts this run, under any layout; this
    # run's own checkpoints win once it has some (resume_if_exists), so a requeued job goes on from them
    resume_from_checkpoint: Optional[str] = None
    # a fresh run (resume_if_exists=false) in a version directory that holds checkpoints is refused; true deletes
    # those checkpoints first (README "Run directories")
    overwrite: bool = False


@dataclass
class TokenizerConfig:
    library: str = "byte"  # byte | char | sentencepiece | huggingface (or a registered library)
    # sentencepiece .model path; char: optional file listing the characters; huggingface: a Hugging Face model
    # directory with tokenizer.json (+ tokenizer_config.json), or a tokenizer.json path
    model: Optional[str] = None


@dataclass
class DataConfig:
    # [w1, prefix1, w2, prefix2, ...] or [prefix] (split by splits_string); empty = built-in default corpus; or a
    # dict {train: [...], validation: [...], test: [...]} of separate files per split (README "Real corpora")
    data_prefix: Any = None
    data_impl: str = "mmap"  # mmap (.bin/.idx) | text_mmap (text, a document per line) | jsonl: tokenized on the fly
    splits_string: str = "949,50,1"
    index_mapping_dir: Optional[str] = None  # sample-index cache dir (default: <prefix dir>/cache)
    text_key: str = "text"  # data_impl=jsonl: the JSON key holding the document text
    default_corpus_dir: Optional[str] = None  # where the built-in corpus is cached
    num_workers: int = 0
    seed: Optional[int] = None  # default: trainer.seed
    reset_position_ids: bool = False  # positions restart at 0 after every eod
    reset_attention_mask: bool = False  # attention stays within each document (eod-separated) of a sample
    eod_mask_loss: bool = False
    # a synthetic task (megatron_ext.data.synthetic: copy | reverse | sort | histogram | registered ones) instead
    # of the indexed datasets; null = data_prefix. Character-level tasks need model.tokenizer.library=char.
    task: Optional[str] = None
    # the task's parameters: min_len, max_len, alphabet, num_train/num_val/num_test (null = drawn on the fly),
    # val_fraction, test_fraction, bos, plus the task's own (histogram: count); checked when the task is built
    task_params: Dict[str, Any] = field(default_factory=dict)


def default_optim() -> Dict[str, Any]:
    """``model.optim`` when a config gives none (an empty ``model.optim``). Not merged under a given
    ``model.optim``: a key the user removes or leaves out stays out, and the chosen optimizer/scheduler's
    params class supplies its defaults (``megatron_ext.training.optim``, ``lr_schedulers``)."""
    return {
        "name": "adamw",
        "lr": 1e-3,
        "weight_decay": 0.01,
        "betas": [0.9, 0.95],
        "sched": {"name": "CosineAnnealing", "warmup_ratio": 0.1, "min_lr": 1e-4},
    }


@dataclass
class MegaArchConfig:
    """``model.mega`` (``model.arch=mega``) / ``model.encoder.mega``, ``model.decoder.mega`` (``arch: mega``): the Mega
    layer's own settings, with Hugging Face ``MegaConfig`` field names and meanings. The sizes shared with the
    transformer come from the usual keys: ``hidden_size`` (D), ``num_layers``; dropout: ``hidden_dropout`` is Mega's
    ``dropout_prob``, ``hidden_dropout_prob`` and ``nffn_activation_dropout_prob``, ``attention_dropout`` its
    ``attention_probs_dropout_prob``. Decoders always use a causal EMA; ``bidirectional`` applies to encoders."""

    ema_projection_size: int = 16  # N: EMA dimensions per channel
    shared_representation_size: int = 64  # Z: the shared q/k representation
    intermediate_size: Optional[int] = None  # H: value / gated-attention width; default 2 * hidden_size
    bidirectional: bool = True  # encoders only (decoders are causal)
    truncation: Optional[int] = None  # cap on the EMA kernel length
    chunk_size: int = -1  # attention within chunks of this many tokens; -1 = whole sequence
    normalization_type: str = "scalenorm"  # layernorm | scalenorm | rmsnorm | batchnorm | syncbatchnorm
    normalize_before_mega: bool = True
    norm_affine: bool = True
    activation: str = "silu"
    attention_activation: str = "softmax"  # softmax | laplace | relu2
    relative_positional_bias: str = "rotary"  # rotary | simple
    max_positions: Optional[int] = None  # simple bias: longest attention window; default the sequence length
    use_normalized_ffn: bool = True
    nffn_hidden_size: Optional[int] = None  # default 2 * hidden_size
    normalize_before_ffn: bool = True
    use_feature_dropout: bool = False
    ema_impl: str = "auto"  # auto (fused C++/CUDA kernel when it builds, else fft with a warning) | fused | fft | scan
    final_norm: bool = True  # a pre-norm stack ends with a norm of normalization_type (Hugging Face's MegaModel: none)
    # the LM head of model.arch=mega (pretrain_gpt.py only; Hugging Face MegaForCausalLM's head, for imported models)
    lm_hidden_dense_layer: bool = False  # tanh(Linear(hidden, hidden)) before the output layer (add_lm_hidden_dense_layer)
    lm_head_bias: bool = False  # a learned bias per vocabulary entry on the logits (lm_head.bias)


@dataclass
class ModelConfig:
    # batch
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 128
    # architecture
    arch: str = "transformer"  # transformer | mega (settings under model.mega)
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: Optional[int] = None  # default 4*hidden (SwiGLU: 8/3*hidden rounded to 64)
    num_attention_heads: int = 4
    # key/value heads (grouped-query attention; megatron-core's name): null = num_attention_heads; must divide the
    # heads and be divisible by tensor_model_parallel_size. Exported to Llama's num_key_value_heads.
    num_query_groups: Optional[int] = None
    max_position_embeddings: Optional[int] = None  # default seq_length
    normalization: str = "layernorm"  # layernorm | rmsnorm
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu (exact erf) | gelu_tanh (GPT-2's tanh approximation) | swiglu
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope
    rotary_base: float = 10000.0
    share_embeddings_and_output_weights: bool = True
    bias: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    activations_checkpoint_granularity: Optional[str] = None  # null | full
    # attention within packed documents (model.data.reset_attention_mask=true): auto | packed | mask | varlen
    document_attention: str = "auto"
    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0
    offload_optimizer: Optional[str] = None  # null | cpu : ZeRO 1-3 optimizer state (and step) on the CPU
    offload_param: Optional[str] = None  # null | cpu : ZeRO 3 parameters on the CPU
    deepspeed_config: Optional[str] = None  # path to a DeepSpeed JSON (overrides zero_stage etc.)
    # checkpoint to start from (weights+optimizer), e.g. for evaluation with limit_train_batches=0
    ckpt_path: Optional[str] = None
    mega: MegaArchConfig = field(default_factory=MegaArchConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: Dict[str, Any] = field(default_factory=dict)  # no name = over default_optim()

    def __post_init__(self) -> None:
        # validated once, at construction (a model built from this config trusts it); the device-dependent checks
        # use this machine's (a run checks them for trainer.accelerator: config.validation.check_run_config)
        check_gpt_model_config(self)


@dataclass
class GPTConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


# ---------------------------------------------------------------------------------------------------------------
# Encoder-decoder (BART-style) pretraining: pretrain_bart.py, configs/bart/


@dataclass
class TransformerStackConfig:
    """One side of an encoder-decoder (``model.encoder`` / ``model.decoder``)."""

    arch: str = "transformer"  # encoder: transformer | perceiver | mega ; decoder: transformer | mega
    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: Optional[int] = None  # default 4*hidden (SwiGLU: 8/3*hidden rounded to 64)
    num_attention_heads: int = 4
    normalization: str = "layernorm"  # layernorm | rmsnorm
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu (exact erf) | gelu_tanh (GPT-2's tanh approximation) | swiglu
    bias: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    activations_checkpoint_granularity: Optional[str] = None  # null | full
    # perceiver encoder only
    hidden_steps: int = 32  # number of latent vectors (the fixed-size memory the decoder attends to)
    num_self_attention_per_cross_attention: int = 1
    # arch: mega only
    mega: MegaArchConfig = field(default_factory=MegaArchConfig)


@dataclass
class BARTDataConfig:
    # [w1, path1, w2, path2, ...] or [path]: .bin/.idx prefixes (data_impl=mmap) or text files (data_impl=text_mmap);
    # empty = the built-in corpus (mmap); or a dict {train: [...], validation: [...], test: [...]} (README "Real
    # corpora")
    data_prefix: Any = None
    data_impl: str = "mmap"  # mmap | text_mmap | jsonl
    splits_string: str = "949,50,1"
    index_mapping_dir: Optional[str] = None  # where index caches go when the data directory is read-only
    default_corpus_dir: Optional[str] = None
    num_workers: int = 0
    seed: Optional[int] = None  # default: trainer.seed
    # BART noising (text infilling)
    masked_lm_prob: float = 0.15  # fraction of tokens masked
    poisson_lambda: float = 3.0  # mean span length (Poisson); each span becomes ONE mask token
    whole_word_masking: bool = False  # spans start and end on word boundaries
    permute_sentences: bool = False  # shuffle the sentences of each sample (BART sentence permutation)
    delete_mask_prob: float = 0.0  # a span is deleted instead of replaced by <mask> with this probability
    # data_impl=jsonl: one JSON object per line; the text under text_key, numeric attribute columns (for guided_cls)
    text_key: str = "text"
    attribute_keys: List[str] = field(default_factory=list)


@dataclass
class EncoderDecoderModelConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 128  # encoder input length
    seq_length_dec: Optional[int] = None  # decoder length (default seq_length)
    max_position_embeddings: Optional[int] = None  # default max(seq_length, seq_length_dec)
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope
    rotary_base: float = 10000.0
    share_embeddings_and_output_weights: bool = True  # encoder/decoder token embeddings are always shared
    make_vocab_size_divisible_by: int = 128
    encoder: TransformerStackConfig = field(default_factory=TransformerStackConfig)
    decoder: TransformerStackConfig = field(default_factory=TransformerStackConfig)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0
    offload_optimizer: Optional[str] = None
    offload_param: Optional[str] = None
    deepspeed_config: Optional[str] = None
    ckpt_path: Optional[str] = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: BARTDataConfig = field(default_factory=BARTDataConfig)
    optim: Dict[str, Any] = field(default_factory=dict)  # no name = over default_optim()
    # the hiddens module between encoder and decoder (MIM / VAE); configured by a later part of the project
    hiddens: Dict[str, Any] = field(default_factory=dict)  # empty = no hiddens module

    def __post_init__(self) -> None:
        check_encoder_decoder_config(self)  # as ModelConfig.__post_init__


@dataclass
class BARTConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=lambda: ExpManagerConfig(name="megatron_bart"))
    model: EncoderDecoderModelConfig = field(default_factory=EncoderDecoderModelConfig)
