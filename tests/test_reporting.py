"""What a user sees while a model compiles: one summary line in our words, dynamo's warnings held back."""

import logging

from mmlora_fx.capture import GraphBreak
from mmlora_fx.reporting import graph_break_summary, quiet_dynamo


class Record:
    def __init__(self, graph_break=None):
        self.graph_break = graph_break


ITEM = GraphBreak("Data dependent operator Operator `aten._local_scalar_dense.default` has a non-Tensor output",
                  "/site-packages/transformers/vision_utils.py:112 in get_vision_position_ids")
NONZERO = GraphBreak("Dynamic shape operator Operator `aten.nonzero.default`'s output shape depends on data",
                     "/site-packages/transformers/models/qwen2_vl/modeling_qwen2_vl.py:960 in get_rope_index")


def test_summary_counts_breaks_by_place_and_names_the_op():
    text = graph_break_summary([Record(ITEM), Record(), Record(ITEM), Record(NONZERO)], 12.3)
    assert text.startswith("compiled 4 graphs in 12 s; dynamo broke the forward 3 times")
    assert "2x `.item()` at vision_utils.py:112 in get_vision_position_ids" in text
    assert "`aten.nonzero.default` at modeling_qwen2_vl.py:960 in get_rope_index" in text
    assert "mmlora-fx inspect" in text


def test_summary_lists_a_few_places_and_counts_the_rest():
    places = [GraphBreak("`op`", f"/x/file.py:{line} in f") for line in range(5)]
    text = graph_break_summary([Record(place) for place in places], 1.0, listed=3)
    assert "and 2 more places" in text


def test_summary_without_breaks():
    assert graph_break_summary([Record()], 2.0) == "compiled 1 graph in 2 s with no graph break"


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_quiet_dynamo_holds_back_warnings_not_errors(monkeypatch):
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    # Stands in for the handler torch._logging gives torch._dynamo (it writes to standard error).
    handler = ListHandler()
    logging.getLogger("torch._dynamo").addHandler(handler)
    try:
        log = logging.getLogger("torch._dynamo.variables.tensor")
        with quiet_dynamo():
            log.warning("held-back graph break warning")
            log.error("an error that must show")
        with quiet_dynamo(verbose=True):
            log.warning("verbose warning shows")
        log.warning("warning outside shows")
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert handler.messages == ["an error that must show", "verbose warning shows", "warning outside shows"]
