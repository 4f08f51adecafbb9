"""Data pipeline: story sources, the byte-level BPE, the token cache and batches.

Typical use (what the trainer does)::

    data = prepare_data(cfg, run_dir)                      # tokenizer + cached train/val streams
    batches = TrainBatches(data.train, cfg.data.mode, cfg.data.seq_len, cfg.train.seed,
                           data.tokenizer.pad_id, data.tokenizer.eos_id)
    x_BT, y_BT = batches.batch(step, global_batch, start, count)
    for x_BT, y_BT in eval_batches(data.val, cfg.data.seq_len, batch_size): ...
"""

from .batches import TrainBatches, count_eval_targets, eval_batches
from .cache import TokenStream, build_token_stream
from .packaged import ATTRIBUTION, builtin_ood_text
from .prepare import PreparedData, encode_stories_for_eval, prepare_data
from .sources import builtin_stories, load_stories, read_story_file, source_key
from .tokenizer import BPETokenizer

__all__ = [
    "ATTRIBUTION", "BPETokenizer", "PreparedData", "TokenStream", "TrainBatches", "build_token_stream",
    "builtin_ood_text", "builtin_stories", "count_eval_targets", "encode_stories_for_eval", "eval_batches",
    "load_stories", "prepare_data", "read_story_file", "source_key",
]
