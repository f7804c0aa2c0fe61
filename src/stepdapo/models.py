"""Loading policies and critics (and the critic's batched inference), and the tiny model's factory
and character-level tokenizer.

The tiny model is a real `LlamaForCausalLM` with a real `PreTrainedTokenizerFast`, saved and loaded
with `save_pretrained` / `from_pretrained`, so the tiny model and a real LM take one code path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from stepdapo.config import TinyModelConfig
from stepdapo.errors import ModelPathError
from stepdapo.logprobs import LOGITS_CHUNK, MAX_BATCH_TOKENS
from stepdapo.runner import ModelStage

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# Every character the built-in task writes; anything else maps to <unk>.
CHARSET = "0123456789+-*=?A\n "


def char_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per character, BOS prepended like Llama's."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + list(dict.fromkeys(charset)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL_TOKENS)


def tiny_llama(tokenizer: PreTrainedTokenizerFast, cfg: TinyModelConfig, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def is_gguf(path: str | os.PathLike) -> bool:
    return str(path).endswith(".gguf")


def check_model_dir(path: str | os.PathLike, tokenizer: bool = True, weights: bool = True) -> Path:
    """The model path, resolved, after a cheap check that it is a loadable model: an HF directory
    (a config.json that is a JSON object with a known `model_type`; unless `weights=False`, weights
    that are present, non-empty and, for safetensors, whose header is whole; unless
    `tokenizer=False`, a tokenizer) or a GGUF file (its header and tensor table whole, every
    tensor's data inside the file). No tensor is loaded. Anything wrong is a ModelPathError naming the file: a stage calls this before it
    claims its output directory, so a broken model leaves nothing behind."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))  # configs may say ~/.cache/...
    if not p.exists():
        raise ModelPathError(f"model path not found: {p}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelPathError(f"{p} is not a Hugging Face model directory (no config.json)")
    if p.is_file() and not is_gguf(p):
        raise ModelPathError(f"{p}: a model is an HF directory or a .gguf file")
    if p.is_file():
        _check_gguf(p)
    else:
        _check_hf_dir(p, tokenizer, weights)
    return p


def check_critic(path: str | os.PathLike) -> Path:
    """`check_model_dir` for a critic directory the critic stage saved: also, for a LogRatioCritic,
    its metadata, its value head and the reference model it names."""
    p = check_model_dir(path)
    if p.is_dir() and LogRatioCritic.saved_in(p):
        _check_safetensors(p / LogRatioCritic.HEAD, "the critic's value head")
        LogRatioCritic.reference_of(p)
    return p


_INCOMPLETE = "the model directory is incomplete"
# what AutoTokenizer can build a tokenizer from (tokenizer_config.json alone names a class that
# then needs one of the others, but a saved fast tokenizer always has tokenizer.json)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model")


def _read_json_file(f: Path, what: str):
    """A small JSON file's value; every way it can be broken is a ModelPathError naming it."""
    try:
        data = f.read_bytes()
    except OSError as e:
        raise ModelPathError(f"{f}: cannot read {what} ({e.strerror})") from None
    if not data:
        raise ModelPathError(f"{f}: empty file (0 bytes); {_INCOMPLETE}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ModelPathError(f"{f}: {what} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ModelPathError(f"{f}: {what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _check_hf_dir(d: Path, tokenizer: bool, weights: bool) -> None:
    config = _read_json_file(d / "config.json", "the model config")
    if not isinstance(config, dict):
        raise ModelPathError(f"{d / 'config.json'}: the model config must be a JSON object, not a "
                             f"{type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelPathError(f"{d / 'config.json'}: no model_type; not a Hugging Face model config")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelPathError(f"{d / 'config.json'}: model_type {model_type!r} is not one this transformers "
                             f"version knows")
    if weights:
        _check_weights(d)
    if tokenizer:
        found = [f for f in _TOKENIZER_FILES if (d / f).is_file()]
        if not found:
            raise ModelPathError(f"{d}: no tokenizer (none of {', '.join(_TOKENIZER_FILES[:4])}, ...); "
                                 f"{_INCOMPLETE}")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if name in found and not isinstance(_read_json_file(d / name, "the tokenizer"), dict):
                raise ModelPathError(f"{d / name}: the tokenizer must be a JSON object")


def _check_weights(d: Path) -> None:
    """The weights transformers would load, in its order of preference: model.safetensors, its
    sharded index, pytorch_model.bin, its sharded index."""
    if (d / "model.safetensors").is_file():
        return _check_safetensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").is_file():
        for shard in _index_shards(d / "model.safetensors.index.json"):
            _check_safetensors(shard)
        return None
    if (d / "pytorch_model.bin").is_file():
        return _check_torch_bin(d / "pytorch_model.bin")
    if (d / "pytorch_model.bin.index.json").is_file():
        for shard in _index_shards(d / "pytorch_model.bin.index.json"):
            _check_torch_bin(shard)
        return None
    raise ModelPathError(f"{d}: no weights (model.safetensors, pytorch_model.bin or a sharded *.index.json); "
                         f"{_INCOMPLETE}")


def _index_shards(index: Path) -> list[Path]:
    data = _read_json_file(index, "the sharded weights' index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelPathError(f"{index}: no weight_map of tensor names to shard files")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise ModelPathError(f"{shard}: missing; {index.name} lists it as a shard of the weights: {_INCOMPLETE}")
    return shards


def _not_empty(f: Path) -> int:
    size = f.stat().st_size
    if size == 0:
        raise ModelPathError(f"{f}: empty file (0 bytes); {_INCOMPLETE}")
    return size


def _check_safetensors(f: Path, what: str = "the model's weights") -> None:
    """A safetensors file whose header is whole (8-byte length, JSON) and whose tensors' data
    fits in the file: not the tensors themselves."""
    import struct

    if not f.is_file():
        raise ModelPathError(f"{f}: missing ({what}); {_INCOMPLETE}")
    size = _not_empty(f)
    bad = f"{f}: not a whole safetensors file ({what}): "
    if size < 8:
        raise ModelPathError(bad + f"{size} bytes, shorter than the 8-byte header length")
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n == 0 or 8 + n > size:
            raise ModelPathError(bad + f"its header length ({n} bytes) does not fit in the file ({size} bytes): "
                                 f"truncated or not safetensors")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelPathError(bad + "its header is not JSON: damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise ModelPathError(bad + "its header is not a JSON object")
    data_size, end = size - 8 - n, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ModelPathError(bad + f"tensor {name!r} has no data_offsets")
        end = max(end, offsets[1])
    if end > data_size:
        raise ModelPathError(bad + f"its tensors need {end} bytes of data, the file holds {data_size}: truncated")


def _check_torch_bin(f: Path) -> None:
    """A PyTorch checkpoint: not empty; the zip format's directory (at the file's end) readable."""
    import zipfile

    _not_empty(f)
    with open(f, "rb") as fh:
        magic = fh.read(4)
    if magic.startswith(b"PK"):
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise ModelPathError(f"{f}: not a whole PyTorch checkpoint ({e}): truncated or damaged") from None
    elif not magic.startswith(b"\x80"):  # the legacy format is a pickle
        raise ModelPathError(f"{f}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")


_GGUF_CHECKED: dict[tuple, None] = {}


def _check_gguf(f: Path) -> None:
    """A GGUF file's header, key-value metadata and tensor table parse, and every tensor's data lies
    inside the file; parsed here (struct over a memory map: the gguf package's reader decodes every
    array, seconds for a real vocabulary), no tensor read. Remembered per (path, size, mtime)."""
    import mmap
    import struct

    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key in _GGUF_CHECKED:
        return
    _not_empty(f)
    with open(f, "rb") as fh:
        if fh.read(4) != b"GGUF":
            fh.seek(0)
            head = fh.read(16)
            raise ModelPathError(f"{f}: not a GGUF file (it does not begin with the GGUF magic; its first bytes "
                                 f"are {head[:8].hex(' ')})")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            try:
                _gguf_layout(f, m, st.st_size)
            except ModelPathError:
                raise
            except struct.error:
                raise ModelPathError(f"{f}: truncated GGUF file: its header or tensor table ends early (the "
                                     f"file has {st.st_size} bytes)") from None
            except (IndexError, ValueError, OverflowError, UnicodeDecodeError) as e:
                raise ModelPathError(f"{f}: a truncated or damaged GGUF file ({e})") from None
    _GGUF_CHECKED[key] = None


def _gguf_layout(f: Path, m, size: int) -> None:
    import struct

    from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    pos = 4

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, m, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string() -> bytes:
        nonlocal pos
        n = take("Q")
        if pos + n > size:
            raise ValueError(f"a string of {n} bytes at offset {pos} runs past the end of the file")
        pos += n
        return m[pos - n:pos]

    def value(t: int):
        nonlocal pos
        if t in scalar:
            return take(scalar[t])
        if t == 8:
            return string()
        if t == 9:
            item, count = take("I"), take("Q")
            if item in scalar:
                width = struct.calcsize("<" + scalar[item])
                if pos + width * count > size:
                    raise ValueError(f"an array of {count} values at offset {pos} runs past the end of the file")
                pos += width * count
            else:
                for _ in range(count):
                    value(item)
            return None
        raise ValueError(f"unknown metadata value type {t} at offset {pos - 4}")

    version = take("I")
    if version not in (2, 3):
        raise ModelPathError(f"{f}: GGUF version {version} (2 or 3 are read)")
    n_tensors, n_kv = take("Q"), take("Q")
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        name = string()
        v = value(take("I"))
        if name == b"general.alignment" and isinstance(v, int) and v > 0:
            alignment = v
    tensors = []
    for _ in range(n_tensors):
        name = string().decode("utf-8", "replace")
        dims = [take("Q") for _ in range(take("I"))]
        kind, offset = take("I"), take("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ModelPathError(f"{f}: tensor {name!r} has an unknown type ({kind}): damaged, or a newer GGUF "
                                 f"than this gguf package reads") from None
        n = 1
        for d in dims:
            n *= d
        tensors.append((name, offset, n // block * type_size))
    start = pos + (-pos) % alignment
    for name, offset, nbytes in tensors:
        if start + offset + nbytes > size:
            raise ModelPathError(f"{f}: truncated GGUF file: tensor {name!r} needs bytes up to "
                                 f"{start + offset + nbytes}, the file has {size}")


def _source(path: str | os.PathLike, tokenizer: bool = False, weights: bool = False) -> tuple[Path, dict]:
    """(directory, from_pretrained kwargs) of an HF directory or a GGUF file, checked
    (`check_model_dir`; by default its config only: a plan reads just that)."""
    p = check_model_dir(path, tokenizer=tokenizer, weights=weights)
    return (p.parent, {"gguf_file": p.name}) if p.is_file() else (p, {})


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of an HF directory or a GGUF file, left-padded, with a pad token."""
    d, kw = _source(path, tokenizer=True)  # no weights needed: a plan counts tokens with a stand-in's
    tokenizer = AutoTokenizer.from_pretrained(d, **kw)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load an HF causal LM (a directory, or a GGUF file, dequantized) and its tokenizer."""
    d, kw = _source(path, tokenizer=True, weights=True)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, **kw)
    if kw:  # a dequantized GGUF model is a plain model: let it be trained and saved as one
        model.hf_quantizer = None
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.is_quantized = False
    model.eval()
    return model, tokenizer


def load_critic(path: str | os.PathLike):
    """Load a critic saved by the critic stage and its tokenizer: a `LogRatioCritic`, or a
    sequence-classification model with one logit (`critic.log_ratio_beta: 0`)."""
    p = check_critic(path)
    model = LogRatioCritic.from_pretrained(p) if LogRatioCritic.saved_in(p) else \
        AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(p)


class LogRatioCritic(torch.nn.Module):
    """A critic whose logit adds to a value head the log-ratio of the solution so far between its
    own language model and the frozen reference that language model started from:

        logit V(x) = head(h(x)) + beta * sum over x's solution tokens t of
                     [log pi_theta(x_t | x_<t) - log pi_ref(x_t | x_<t)]

    h(x) is pi_theta's last hidden state at x's last token, head a linear layer; pi_theta and pi_ref
    start as the same policy, so the critic starts as the paper's (a value head on the policy).
    Why: a wrong step is a token the language model can learn to find unlikely, where a value head
    on the last token must learn to check every earlier step itself. On the built-in task the head
    alone stays on a depth-only plateau on 2 seeds in 5 (bench/results/critic-plateau.md); with the
    log-ratio term every seed's critic checks the arithmetic within ~240 steps. The form is the
    implicit process reward of Yuan et al. 2024 ("Free process rewards without process labels"),
    here trained on Monte-Carlo values and with the head for what the solution so far cannot show
    (how hard the rest of the problem is).

    Saved as a plain HF causal LM (pi_theta) with `value_head.safetensors` and
    `stepdapo_log_ratio_critic.json` (beta and where pi_ref is: its path relative to the critic, so
    a run directory can move, and an id of its weight files, `_weights_id`, checked on loading).
    """

    META = "stepdapo_log_ratio_critic.json"
    HEAD = "value_head.safetensors"

    def __init__(self, policy, reference, head: torch.nn.Linear, beta: float, reference_path: str | os.PathLike):
        super().__init__()
        self.policy, self.reference, self.head, self.beta = policy, reference, head, beta
        self.reference_path = Path(reference_path)
        self.reference.requires_grad_(False).eval()
        self.logits_chunk = LOGITS_CHUNK  # positions per vocabulary-projection chunk (config: logits_chunk_tokens)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """What the Trainer calls under `gradient_checkpointing`: pi_theta's layers checkpointed (pi_ref
        keeps no activations: it runs without gradients)."""
        inner = self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy
        if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                  **kwargs)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """The name older transformers' Trainer calls."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    @classmethod
    def start(cls, policy_path: str | os.PathLike, beta: float, initial_value: float) -> "LogRatioCritic":
        """A new critic from a policy: pi_theta and pi_ref both that policy, a small head whose bias
        gives V = initial_value (e.g. the mean training target) everywhere."""
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        reference = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        hidden = policy.config.get_text_config().hidden_size
        head = torch.nn.Linear(hidden, 1)
        v = min(max(initial_value, 1e-4), 1 - 1e-4)
        with torch.no_grad():
            head.weight.normal_(0, 0.1 / hidden ** 0.5)
            head.bias.fill_(float(torch.logit(torch.tensor(v))))
        return cls(policy, reference, head, beta, policy_path)

    @classmethod
    def saved_in(cls, path: str | os.PathLike) -> bool:
        return (Path(path) / cls.META).is_file()

    @classmethod
    def reference_of(cls, path: str | os.PathLike) -> Path:
        """The reference model (pi_ref) a critic saved in `path` names, checked: there, loadable
        (`check_model_dir`, no tokenizer needed) and the one the critic was trained against."""
        p = Path(path)
        meta = _read_json_file(p / cls.META, "the critic's metadata")
        if not isinstance(meta, dict) or not all(k in meta for k in ("beta", "reference", "reference_absolute",
                                                                      "reference_weights")):
            raise ModelPathError(f"{p / cls.META}: not a LogRatioCritic's metadata (beta, reference, "
                                 f"reference_absolute, reference_weights)")
        ref = (p / meta["reference"]).resolve()
        if not (ref / "config.json").is_file() and Path(meta["reference_absolute"], "config.json").is_file():
            ref = Path(meta["reference_absolute"])
        if not (ref / "config.json").is_file():
            raise ModelPathError(f"{p / cls.META}: the critic's reference model {meta['reference']} (relative to the "
                                 f"critic; it was {meta['reference_absolute']}) is missing: it is the policy the "
                                 f"critic started from and is needed to compute its values")
        check_model_dir(ref, tokenizer=False)
        if _weights_id(ref) != meta["reference_weights"]:
            raise ModelPathError(f"{p / cls.META}: the reference model at {ref} is not the one the critic was trained "
                                 f"against (its weight files differ)")
        return ref

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "LogRatioCritic":
        from safetensors.torch import load_file

        p = Path(path)
        meta = json.loads((p / cls.META).read_text())
        ref = cls.reference_of(p)
        policy = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
        head_weights = load_file(p / cls.HEAD)
        head = torch.nn.Linear(head_weights["weight"].shape[1], 1)
        head.load_state_dict(head_weights)
        return cls(policy, AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32), head, meta["beta"], ref)

    def save_pretrained(self, path: str | os.PathLike, published: str | os.PathLike | None = None) -> None:
        """Save pi_theta (LoRA merged), the head and the metadata; pi_ref stays where it is, named
        relative to `published` (where the directory will end up: a stage writes its work directory
        and then renames it), by default `path`."""
        import json

        from safetensors.torch import save_file

        p = Path(path)
        policy = self.policy.merge_and_unload() if hasattr(self.policy, "merge_and_unload") else self.policy
        policy.save_pretrained(p)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, p / self.HEAD)
        ref = self.reference_path.resolve()
        (p / self.META).write_text(json.dumps({
            "beta": self.beta, "reference": os.path.relpath(ref, Path(published or p).resolve()),
            "reference_absolute": str(ref), "reference_weights": _weights_id(ref)}, indent=1))

    def train(self, mode: bool = True):
        super().train(mode)
        self.reference.eval()  # frozen: never in training mode (dropout)
        return self

    def token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens) -> torch.Tensor:
        """The logit at every position p of each right-padded sequence: V's of the prefix x[:p + 1]
        (causal attention and a running sum), [B, T]. The language models' logits are computed only
        from the shortest prompt on (a chat template's tokens never need them)."""
        B, T = input_ids.shape
        starts = torch.as_tensor(prompt_lens, device=input_ids.device).clamp(min=1)
        first = int(starts.min())  # the first token any row counts
        counted = (torch.arange(first, T, device=input_ids.device)[None, :] >= starts[:, None]) \
            & attention_mask[:, first:].bool()
        h, logp = _solution_logps(self.policy, input_ids, attention_mask, first, counted, self.logits_chunk)
        ref_logp = self.reference_logps(input_ids, attention_mask, first, counted)
        ratio = torch.where(counted, logp - ref_logp, 0.0)  # column j: token first + j
        running = torch.cat([ratio.new_zeros(B, first), ratio.cumsum(1)], 1)  # [:, p]: the tokens up to p
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float() + self.beta * running

    @torch.no_grad()
    def reference_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int,
                        counted: torch.Tensor) -> torch.Tensor:
        """log pi_ref(x_t | x_<t) for t = first..T-1 of each right-padded sequence where `counted`,
        else 0, [B, T - first].
        Computed with the batch every time, not kept per sequence: a value kept from another batch
        differs by float noise, which training amplifies, so a resumed critic would not be the
        uninterrupted one (measured: held-out BCE 0.570 against 0.566)."""
        return _solution_logps(self.reference, input_ids, attention_mask, first, counted, self.logits_chunk)[1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lens,
                every_position: bool = False) -> torch.Tensor:
        """The logit of each right-padded sequence at its last token, [B] (`every_position`: the
        `token_logits`, [B, T]). Training calls go through here, so that a DDP wrapper sees them."""
        logits = self.token_logits(input_ids, attention_mask, prompt_lens)
        if every_position:
            return logits
        last = attention_mask.sum(1) - 1
        return logits[torch.arange(len(last)), last]

    def shared_prefix_logits(self, states: list[list[int]], prompt_lens: list[int], rows: list[int],
                             actions: list[list[int]], pad_id: int) -> torch.Tensor:
        """`forward`'s logit of each states[rows[i]] + actions[i], [N], with each state run once by
        pi_theta and once by pi_ref and its actions on its keys/values (stepdapo.logprobs'
        shared-prefix scheme). The log-ratio sum splits at the state's end: its state part (the
        state's tokens from prompt_lens[g] on) once per state, plus each action's own tokens; the
        head reads pi_theta at the action's last token. Every action needs a token, and every
        state must hold its prompt (prompt_lens[g] <= len(states[g])). Not through `forward`:
        for scoring, not for data-parallel training."""
        from stepdapo.logprobs import grouped_logprobs

        state_logp, action_logp, hidden = grouped_logprobs(self.policy, states, rows, actions, pad_id, prompt_lens,
                                                           self.logits_chunk)
        with torch.no_grad():
            ref_state_logp, ref_action_logp, _ = grouped_logprobs(self.reference, states, rows, actions, pad_id,
                                                                  prompt_lens, self.logits_chunk)
        rows = torch.as_tensor(rows, device=action_logp.device)  # token by token, as `token_logits` sums
        ratio = (state_logp - ref_state_logp).sum(-1)[rows] + (action_logp - ref_action_logp).sum(-1)
        last = torch.tensor([len(a) - 1 for a in actions], device=action_logp.device)
        h = hidden[torch.arange(len(actions), device=action_logp.device), last]
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float() + self.beta * ratio


def is_log_ratio_critic(model) -> bool:
    """Whether `model` is a LogRatioCritic, or one wrapped for data-parallel training."""
    return isinstance(getattr(model, "module", model), LogRatioCritic)


def _solution_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int, counted: torch.Tensor,
                    logits_chunk: int):
    """(the last hidden states [B, T, H], log p(x_t | x_<t) for t = first..T-1 where `counted`
    [B, T - first], else 0); the vocabulary projection only for the counted positions, a chunk at a
    time (stepdapo.logprobs.token_logprobs)."""
    from stepdapo.logprobs import _masked_logprobs, forward_hidden

    T = input_ids.shape[1]
    _, hidden, features, head = forward_hidden(model, logits_chunk, T - first + 1, input_ids=input_ids,
                                               attention_mask=attention_mask, use_cache=False)
    # positions first-1..T-2 predict tokens first..T-1
    return hidden, _masked_logprobs(features[:, :-1], input_ids[:, first:], counted, head, logits_chunk)


def _weights_id(model_dir: Path) -> dict[str, str]:
    """Each weight file's size and a digest of its first and last MiB (the header, names and shapes,
    and some weights): tells a retrained or another model in the same place, survives a move or a copy."""
    out = {}
    for f in sorted(Path(model_dir).iterdir()):
        if f.suffix in (".safetensors", ".bin"):
            size = f.stat().st_size
            with open(f, "rb") as fh:
                head = fh.read(2**20)
                fh.seek(max(0, size - 2**20))
                tail = fh.read()
            out[f.name] = f"{size}:{hashlib.sha1(head + tail).hexdigest()[:16]}"
    return out


def pad_right(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RIGHT-pad token sequences: (input_ids, attention_mask), both [B, longest]."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
    return ids, attn


def value_split(x: list[int], prefix_len: int, pad_id: int) -> int:
    """Where x is cut into a shared prefix and its own continuation: at `prefix_len`, but never past
    the token the critic's head reads (the last one that is not `pad_id`, e.g. when eos is the pad
    token), which must be in the continuation. 0: no prefix can be shared."""
    last = max((j for j, t in enumerate(x) if t != pad_id), default=0)  # the head's rule, see critic_logits
    return min(prefix_len, last)


def log_ratio_split(x: list[int], prefix_len: int, prompt_len: int) -> int:
    """`value_split` for a `LogRatioCritic`: its head reads x's last token, which must be in the
    continuation, and every continuation token must be a counted (solution) token, so the cut is not
    before the prompt's end. 0: no prefix can be shared."""
    cut = min(prefix_len, len(x) - 1)
    return cut if cut >= max(prompt_len, 1) else 0


def critic_logits(model, sequences: list[list[int]], pad_id: int, prefix_lens: list[int] | None = None,
                  prompt_lens: list[int] | None = None) -> torch.Tensor:
    """The critic's logit of each token sequence, differentiable. HF's sequence-classification head
    reads the last token that is not its config's pad_token_id, which `pad_id` must be. A
    `LogRatioCritic` needs each sequence's `prompt_lens`.

    With `prefix_lens`, sequences sharing their first prefix_lens[i] tokens (e.g. a state s and its
    s + a_j) run that prefix once and their continuations on its cached keys/values
    (stepdapo.logprobs' shared-prefix scheme); the logits are the same as without. A
    `LogRatioCritic` does this for both its language models (`LogRatioCritic.shared_prefix_logits`;
    a sequence whose prefix would end inside its prompt runs whole); wrapped for data-parallel
    training it runs whole sequences only (the critic stage refuses `critic.shared_prefix` for it).
    """
    from stepdapo.logprobs import _run_continuations, _run_prefixes, keeps_cache

    device = next(model.parameters()).device
    log_ratio = is_log_ratio_critic(model)
    if not log_ratio and not keeps_cache(model):  # training under gradient checkpointing: no cache to share
        prefix_lens = None
    if log_ratio:
        prompt_lens = _prompt_lens(prompt_lens, len(sequences))
        if prefix_lens is not None and not isinstance(model, LogRatioCritic):
            raise ValueError("a LogRatioCritic wrapped for data-parallel training runs whole sequences: no prefix_lens")
    plain, groups = [], {}  # groups: (shared prefix, prompt length or None) -> the sequences' indices
    for i, x in enumerate(sequences):
        if prefix_lens is None:
            cut = 0
        elif log_ratio:
            cut = log_ratio_split(x, prefix_lens[i], prompt_lens[i])
        else:
            cut = value_split(x, prefix_lens[i], pad_id)
        if cut:
            groups.setdefault((tuple(x[:cut]), prompt_lens[i] if log_ratio else None), []).append(i)
        else:
            plain.append(i)
    out = torch.zeros(len(sequences), device=device)
    if plain:  # right padding: the head's last (non-pad) token is each sequence's own
        ids, attn = (t.to(device) for t in pad_right([sequences[i] for i in plain], pad_id))
        logits = model(ids, attn, [prompt_lens[i] for i in plain]) if log_ratio else \
            model(input_ids=ids, attention_mask=attn).logits.squeeze(-1)
        out = out.to(logits.dtype).index_copy(0, torch.tensor(plain, device=device), logits)
    if groups:
        prefixes, members = [list(p) for p, _ in groups], list(groups.values())
        rows = [g for g, m in enumerate(members) for _ in m]
        flat = [i for m in members for i in m]
        conts = [sequences[i][len(prefixes[g]):] for g, i in zip(rows, flat)]
        if log_ratio:
            logits = model.shared_prefix_logits(prefixes, [plen for _, plen in groups], rows, conts, pad_id)
        else:
            _, cache, attn, next_pos, _ = _run_prefixes(model, prefixes, pad_id, device)
            logits = _run_continuations(model, cache, attn, next_pos, torch.tensor(rows, device=device), conts,
                                        pad_id)[0].logits.squeeze(-1)
        out = out.to(logits.dtype).index_copy(0, torch.tensor(flat, device=device), logits)
    return out


def value_head(model) -> torch.nn.Module:
    """The sequence-classification model's head: `score` (Llama, Qwen, Mistral, GPT-2, ...) or
    `classifier`; under PEFT, the wrapper that runs the trained copy."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("score", "classifier"):
            return module
    raise ValueError(f"{type(model).__name__}: no value head named score or classifier")


def _prompt_lens(prompt_lens: list[int] | None, n: int) -> list[int]:
    if prompt_lens is None or len(prompt_lens) != n:
        raise ValueError("a LogRatioCritic needs the prompt length of every sequence (prompt_lens)")
    return prompt_lens


def critic_token_logits(model, sequences: list[list[int]], pad_id: int, prompt_lens: list[int] | None = None
                        ) -> torch.Tensor:
    """The critic's logit at every position of each (right-padded) sequence, differentiable: [B, T].
    Position p's logit is V's of the prefix x[:p + 1] (causal attention), the same number the
    sequence-classification head gives for that prefix alone (a `LogRatioCritic` needs `prompt_lens`)."""
    device = next(model.parameters()).device
    ids, attn = pad_right(sequences, pad_id)
    if is_log_ratio_critic(model):
        return model(ids.to(device), attn.to(device), _prompt_lens(prompt_lens, len(sequences)), every_position=True)
    seen = []
    hook = value_head(model).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:  # the head runs on every position before HF pools the last one: keep them all
        model(input_ids=ids.to(device), attention_mask=attn.to(device))
    finally:
        hook.remove()
    return seen[0].squeeze(-1)


@torch.no_grad()
def critic_values(model, sequences: list[list[int]], pad_id: int, batch_size: int | None = None,
                  prefix_lens: list[int] | None = None, prompt_lens: list[int] | None = None,
                  max_batch_tokens: int = MAX_BATCH_TOKENS) -> list[float]:
    """V(x) = sigmoid(the critic's logit) for each token sequence x, in batches of similar lengths of
    at most `max_batch_tokens` padded tokens (a longer sequence alone; and `batch_size` rows if
    given). With `prefix_lens` (e.g. each s + a's state length), batches keep the sequences of a prefix
    together and compute it once (`critic_logits`): a value-head critic runs it once, a
    `LogRatioCritic` once through each of its two language models (its log-ratio sum split into the
    state's part, once, and each action's). A `LogRatioCritic` needs `prompt_lens`."""
    from stepdapo.logprobs import token_batches

    model.eval()
    if is_log_ratio_critic(model):
        prompt_lens = _prompt_lens(prompt_lens, len(sequences))
    if prefix_lens is None:  # batches of similar lengths
        batches = token_batches([len(x) for x in sequences], max_batch_tokens, batch_size)
    else:  # batches of whole groups, in order of length, cut where the padded size would pass the budget
        order = sorted(range(len(sequences)), key=lambda i: (prefix_lens[i], sequences[i][:prefix_lens[i]],
                                                             len(sequences[i])))
        batches, longest = [[]], 0
        for i in order:
            longest = max(longest, len(sequences[i]))
            if batches[-1] and ((len(batches[-1]) + 1) * longest > max_batch_tokens
                                or (batch_size and len(batches[-1]) >= batch_size)):
                batches.append([])
                longest = len(sequences[i])
            batches[-1].append(i)
    out = [0.0] * len(sequences)
    for idx in batches:
        if not idx:
            continue
        logits = critic_logits(model, [sequences[i] for i in idx], pad_id,
                               None if prefix_lens is None else [prefix_lens[i] for i in idx],
                               None if prompt_lens is None else [prompt_lens[i] for i in idx])
        for i, v in zip(idx, torch.sigmoid(logits.float()).tolist()):
            out[i] = v
    return out


def import_model(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """An HF directory is used where it is; a GGUF file is converted once into `out_dir` (an HF
    directory, float32), because every stage reloads the policy and saves its successor as one.
    Every process of a data-parallel run calls this; rank 0 converts."""
    p = check_model_dir(path)
    if p.is_dir():
        return p
    stage = ModelStage(out_dir, "import", {"gguf": model_fingerprint(p)})

    def convert() -> dict:
        model, tokenizer = load_policy(p)
        model.save_pretrained(stage.model_dir)
        tokenizer.save_pretrained(stage.model_dir)
        return {"source": str(p)}

    stage.run(convert, main_only=True)
    return stage.dir


def model_fingerprint(path: str | os.PathLike) -> str:
    """Identifies a model directory's weights (names, sizes, modification times) for stage
    fingerprints: a stage resumed against different weights must not mix results."""
    p = Path(path)
    if not p.exists():  # e.g. a scripted test policy, named rather than stored
        return str(path)
    h = hashlib.sha1(str(p.resolve()).encode())
    for f in sorted(p.iterdir()) if p.is_dir() else [p]:
        if f.suffix in (".safetensors", ".bin", ".gguf", ".json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
