"""``somoe export RUN OUT``: a folder that loads with ``transformers`` alone.

Writes config.json, model.safetensors, the tokenizer (``PreTrainedTokenizerFast`` files),
generation_config.json and a model card, plus ``configuration_somoe.py`` and
``modeling_somoe.py`` when the model has no exact native class (see ``mapping``).
Everything is written into ``OUT.tmp`` and renamed into place, so a failure leaves
nothing behind and an existing OUT is replaced only with ``--force``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

from ..config import ConfigError
from ..evaluate.runs import LoadedRun, load_run, tokenizer_file
from ..train.checkpoint import CheckpointError
from . import mapping
from .card import model_card

HERE = Path(__file__).parent
SPECIALS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "eos_token": "[EOS]", "bos_token": "[EOS]"}


@dataclass
class Exported:
    out: Path
    native: str | None  # the transformers class, or None for remote code
    checkpoint: Path

    @property
    def trust_remote_code(self) -> bool:
        return self.native is None


def _checkpoint_arg(run: Path, step: int | None) -> Path:
    if step is None:
        return run
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    if not ckpt.is_dir():
        raise CheckpointError(f"{run} has no checkpoint for step {step}; omit --step for the last one")
    return ckpt


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is not a folder; pick another OUT")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"OUT {out}: {blocker} is a file, not a folder; pick another OUT")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} exists and is not empty; pick another OUT or pass --force to replace it")


def export_run(run: str | Path, out: str | Path, force: bool = False, step: int | None = None,
               log=print) -> Exported:
    run, out = Path(run), Path(out)
    _check_out(out, force)
    loaded = load_run(_checkpoint_arg(run, step), device="cpu")
    native, config, weights = mapping.build(loaded.cfg.model, loaded.model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _write(tmp, loaded, native, config, weights)
    except OSError as err:  # a file on the way, a read-only or full disk: the partial export is removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"OUT {out} cannot be written ({err.strerror}: {err.filename}); choose another "
                          f"OUT") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"exported {loaded.checkpoint} -> {out} as {native or 'SomoeForCausalLM (trust_remote_code=True)'}")
    return Exported(out, native, loaded.checkpoint)


def _write(folder: Path, loaded: LoadedRun, native: str | None, config: dict, weights: dict) -> None:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if native is None:
        for name in mapping.REMOTE_FILES:
            shutil.copy2(HERE / name, folder / name)
    write_tokenizer(folder, loaded)
    generation = {"bos_token_id": mapping.BOS_EOS_ID, "eos_token_id": mapping.BOS_EOS_ID,
                  "pad_token_id": mapping.PAD_ID,
                  "do_sample": True, "temperature": 0.8, "top_p": 0.95}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(model_card(loaded, native), encoding="utf-8")


def write_tokenizer(folder: Path, loaded: LoadedRun) -> None:
    """tokenizer.json whose encodings start with [EOS] (somoe's story start: ``generate`` prefixes it
    and every training story follows one), and the ``PreTrainedTokenizerFast`` settings files."""
    tok = Tokenizer.from_file(str(tokenizer_file(loaded)))
    tok.post_processor = processors.TemplateProcessing(single="[EOS] $A", pair="[EOS] $A [EOS] $B:1",
                                                       special_tokens=[("[EOS]", mapping.BOS_EOS_ID)])
    tok.save(str(folder / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIALS,
                "model_max_length": loaded.cfg.model.max_seq_len, "padding_side": "left",
                "model_input_names": ["input_ids", "attention_mask"],  # 4.x would add token_type_ids
                "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIALS, indent=2) + "\n", encoding="utf-8")
