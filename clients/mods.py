"""Flower client mods around the bank's ClientApp: SecAgg+ when the server asks for it, no plaintext leaks."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from models.federation import EVAL_PREFIX, REPORT_KEYS, TASK, TASK_TRAIN

CallNext = Callable[[Message, Context], Message]
Mod = Callable[[Message, Context, CallNext], Message]


def _is_secagg(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def scrub_plaintext_mod(msg: Message, ctxt: Context, call_next: CallNext) -> Message:
    """Outermost: SecAgg+ masks the update and its weight but leaves num_examples and fit metrics in clear.

    num_examples becomes 1; of the fit metrics only the bank's privacy report (`REPORT_KEYS`) and its score
    of the previous global model (`eval-*`, what an evaluation reply carries) are kept.
    """
    out = call_next(msg, ctxt)
    if msg.metadata.message_type != MessageType.TRAIN or out.has_error() or not _is_secagg(msg):
        return out
    if "fitres.num_examples" in out.content.metric_records:
        out.content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": 1})
        metrics = out.content.config_records.get("fitres.metrics") or ConfigRecord({})
        kept = {k: v for k, v in metrics.items() if k in REPORT_KEYS or k.startswith(EVAL_PREFIX)}
        out.content.config_records["fitres.metrics"] = ConfigRecord(kept)
    return out


def optional_secaggplus_mod(msg: Message, ctxt: Context, call_next: CallNext) -> Message:
    """Run SecAgg+ only for messages of a SecAgg+ round (the plain mod fails on plaintext rounds)."""
    if _is_secagg(msg):
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def skip_for_stats(mod: Mod) -> Mod:
    """Wrap a TRAIN mod (e.g. client-level DP clipping) so that it acts on training rounds only."""

    def wrapped(msg: Message, ctxt: Context, call_next: CallNext) -> Message:
        config = msg.content.config_records.get("fitins.config")
        if config is not None and config.get(TASK) != TASK_TRAIN:
            return call_next(msg, ctxt)
        return mod(msg, ctxt, call_next)

    return wrapped
