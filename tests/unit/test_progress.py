"""Progress bars: on only where someone watches (rank 0, a terminal or BUNDLE_PROGRESS=1), never changing the loop."""

import io

import pytest
import torch
from ignite.engine import Engine, Events

import common.distributed
import common.engines.progress as progress_module
from common.engines.progress import ENV_VAR, ProgressBarHandler, loss_postfix, progress, progress_enabled


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def not_a_terminal(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())


def test_progress_yields_every_item_on_and_off():
    items = list(range(7))
    assert list(progress(iter(items), "on", total=7, enabled=True)) == items
    assert list(progress(items, "off", enabled=False)) == items


def test_enabled_by_terminal_and_environment(monkeypatch, not_a_terminal, caplog):
    assert not progress_enabled()  # stderr is not a terminal: CI logs stay clean
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert progress_enabled()
    for value, expected in (("0", False), ("off", False), ("1", True), ("TRUE", True)):
        monkeypatch.setenv(ENV_VAR, value)
        assert progress_enabled() is expected
    monkeypatch.setenv(ENV_VAR, "0")
    assert progress_enabled(True)  # an explicit argument wins over the environment
    items = [1, 2, 3]
    assert progress(items, "off") is items  # disabled: the iterable itself, no wrapper
    monkeypatch.setenv(ENV_VAR, "maybe")
    assert progress_enabled()  # unknown value: reported, then the terminal decides
    assert "maybe" in caplog.text


def test_never_on_other_ranks(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    monkeypatch.setattr(progress_module, "get_rank", lambda: 1)
    assert not progress_enabled() and not progress_enabled(True)
    items = [1, 2]
    assert progress(items, "rank 1", enabled=True) is items


def test_rank0_handlers_drop_the_bar(monkeypatch):
    handler = ProgressBarHandler(enabled=True)
    assert common.distributed.rank0_handlers([handler]) == [handler]
    monkeypatch.setattr(common.distributed, "get_rank", lambda: 1)
    assert common.distributed.rank0_handlers([handler]) == []


def test_loss_postfix_reads_monai_outputs():
    assert loss_postfix([{"loss": torch.tensor(0.5)}, {"loss": torch.tensor(0.5)}]) == {"loss": 0.5}
    assert loss_postfix({"loss": 2.0}) == {"loss": 2.0}
    assert loss_postfix(None) == {} and loss_postfix([{"pred": torch.zeros(1)}]) == {}


def _trainer() -> Engine:
    return Engine(lambda engine, batch: [{"loss": torch.tensor(float(batch))}])


def test_handler_shows_loss_and_closes_each_epoch(capsys):
    engine = _trainer()
    handler = ProgressBarHandler(enabled=True)
    closed = []
    handler.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: closed.append(handler.pbar is None))
    engine.run([1, 2, 3], max_epochs=2)
    assert closed == [True, True] and handler.pbar is None  # closed at every EPOCH_COMPLETED, before later handlers
    err = capsys.readouterr().err
    assert "Epoch [2/2]" in err and "loss=3" in err


def test_handler_for_evaluators_and_disabled(capsys):
    evaluator = Engine(lambda engine, batch: [{"pred": torch.zeros(1)}])
    ProgressBarHandler(desc="validation", enabled=True).attach(evaluator)
    evaluator.run([0, 1], max_epochs=1)
    assert "validation" in capsys.readouterr().err
    engine = _trainer()
    handler = ProgressBarHandler(enabled=False)
    handler.attach(engine)
    engine.run([1, 2], max_epochs=1)
    assert handler.pbar is None and capsys.readouterr().err == ""
