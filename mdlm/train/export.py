"""The final export: unsharded (EMA) weights written as a ``save_pretrained`` directory, locally or to a URL."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from mdlm.data.spec import DataSpec
from mdlm.hub import write_model_dir
from mdlm.model_card import ModelCardInfo
from mdlm.modeling import MDLM, ARModel
from mdlm.storage import is_url, read_bytes
from mdlm.train.checkpoint import full_state_dict
from mdlm.train.collectives import rank_and_world
from mdlm.train.ema import EMA


def export_model(model: MDLM | ARModel, ema: EMA | None, export_dir: str, data: DataSpec,
                 card: ModelCardInfo | None = None) -> None:
    """Collective: gather the full weights (the EMA's when given); rank 0 writes ``config.json``,
    ``model.safetensors``, the data's tokenizer files and the model card (``card``: data and training figures) to
    ``export_dir`` (atomically; a URL through a local temporary directory)."""
    state = full_state_dict(model, ema)
    if rank_and_world()[0] != 0:
        return
    tokenizer = None
    if data.tokenizer_file:
        from tokenizers import Tokenizer

        with contextlib.suppress(FileNotFoundError):  # local or a URL (data prepared on object storage)
            tokenizer = Tokenizer.from_str(read_bytes(data.tokenizer_file).decode())

    def write(path: str | Path) -> Path:
        return write_model_dir(path, model_type=model.model_type, model_config=model.config,
                               noise_config=model.noise_config, state_dict=state, tokenizer=tokenizer, card=card)

    if is_url(export_dir):
        import pyarrow.fs as pafs

        with tempfile.TemporaryDirectory(prefix="mdlm-export-") as tmp:
            pafs.copy_files(str(write(Path(tmp) / "model")), export_dir)
    else:
        write(export_dir)
