"""Resumable checkpoints (kill + resume == uninterrupted run), atomicity, clear mismatch errors, NaNGuard."""

import random

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from common.engines.checkpoint import CheckpointMismatchError, ResumableCheckpointHandler, load_weights
from common.engines.guards import NaNGuard, NonFiniteLossError

EPOCHS, BATCHES_PER_EPOCH = 3, 5


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing in the engine can handle it."""


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def make_net(hidden=8):
    return torch.nn.Sequential(
        torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(hidden, 1)
    )


def make_run(seed, checkpoint_dir, interval_iterations=3, kill_at=(), nan_at=None):
    """A tiny trainer whose result depends on every random source: shuffling, dropout, numpy and python noise."""
    seed_everything(seed)  # a resumed run starts from a different seed: only the checkpoint can make it match
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(2 * BATCHES_PER_EPOCH, 4, generator=g), torch.randn(2 * BATCHES_PER_EPOCH, 1, generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2, shuffle=True)
    net = make_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def step(engine, batch):
        xb, yb = batch
        xb = xb + 0.01 * torch.from_numpy(np.random.randn(*xb.shape)).float() + 0.01 * random.random()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(xb), yb)
        if engine.state.iteration == nan_at:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    engine = Engine(step)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: sched.step())
    handler = ResumableCheckpointHandler(
        checkpoint_dir, {"network": net, "opt": opt, "sched": sched}, interval_iterations
    )
    handler.attach(engine)
    for k in kill_at:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=k), lambda _: (_ for _ in ()).throw(Killed()))
    return engine, loader, net, handler


def final_weights(seed, checkpoint_dir, **kwargs):
    engine, loader, net, _ = make_run(seed, checkpoint_dir, **kwargs)
    engine.run(loader, max_epochs=EPOCHS)
    return [p.detach().clone() for p in net.parameters()]


def saved_iteration(path):
    return torch.load(path, weights_only=True)["engine"]["iteration"]


@pytest.mark.parametrize(
    "kills, last_saves",
    [
        ([8], [6]),  # mid-epoch checkpoint (iteration 6 of epochs of 5): the resumed epoch replays its batch order
        ([11], [10]),  # killed after an epoch-end checkpoint
        ([8, 13], [6, 12]),  # killed twice: the second resume relies on state saved by a resumed run
    ],
)
def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, kills, last_saves):
    reference = final_weights(0, tmp_path / "reference")
    ckpt = tmp_path / "resumed"
    for i, (kill, last) in enumerate(zip(kills, last_saves)):
        with pytest.raises(Killed):
            final_weights(0 if i == 0 else 100 + i, ckpt, kill_at=(kill,))
        assert saved_iteration(ckpt / "checkpoint.pt") == last
    resumed = final_weights(7, ckpt)
    assert all(torch.equal(a, b) for a, b in zip(reference, resumed))
    assert saved_iteration(ckpt / "checkpoint.pt") == EPOCHS * BATCHES_PER_EPOCH


def test_monai_trainer_with_random_transforms_resumes_exactly(tmp_path):
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from monai.transforms import Compose, RandGaussianNoised, RandScaleIntensityd

    def build(seed, ckpt, kill=None):
        seed_everything(seed)
        g = torch.Generator().manual_seed(5)
        data = [{"image": torch.randn(4, generator=g), "label": torch.randn(1, generator=g)} for _ in range(8)]
        transform = Compose([RandGaussianNoised("image", prob=1.0, std=0.1), RandScaleIntensityd("image", 0.2, 0.5)])
        loader = DataLoader(Dataset(data, transform), batch_size=2, shuffle=True, num_workers=0)
        net = make_net()
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=3,
            train_data_loader=loader,
            network=net,
            optimizer=opt,
            loss_function=torch.nn.MSELoss(),
        )
        save = {"network": net, "optimizer": opt, "trainer": trainer, "data": loader}
        ResumableCheckpointHandler(ckpt, save, interval_iterations=2).attach(trainer)
        if kill:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(once=kill), lambda _: (_ for _ in ()).throw(Killed()))
        return trainer, net

    trainer, net = build(0, tmp_path / "reference")
    trainer.run()
    reference = [p.detach().clone() for p in net.parameters()]
    trainer, _ = build(0, tmp_path / "resumed", kill=7)  # last checkpoint: iteration 6, mid-epoch 2
    with pytest.raises(Killed):
        trainer.run()
    trainer, net = build(1, tmp_path / "resumed")
    trainer.run()
    assert trainer.state.iteration == 12 and trainer.state.epoch == 3
    assert all(torch.equal(a, b) for a, b in zip(reference, net.parameters()))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    engine, loader, net, handler = make_run(0, tmp_path, interval_iterations=None)
    engine.run(loader, max_epochs=1)
    path = tmp_path / "checkpoint.pt"
    before = path.read_bytes()

    def torch_save_dies_midway(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torch_save_dies_midway)
    engine.state.iteration = 99
    with pytest.raises(OSError, match="disk full"):
        handler.save(engine)
    monkeypatch.undo()
    assert path.read_bytes() == before and saved_iteration(path) == BATCHES_PER_EPOCH
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left behind


def test_mismatch_errors_name_file_and_keys(tmp_path):
    engine, loader, net, _ = make_run(0, tmp_path, interval_iterations=None)
    engine.run(loader, max_epochs=1)
    path = tmp_path / "checkpoint.pt"

    wider = make_net(hidden=9)
    with pytest.raises(CheckpointMismatchError) as err:
        load_weights(wider, path, key="network")
    message = str(err.value)
    assert str(path) in message and "0.weight" in message and "(8, 4)" in message and "(9, 4)" in message

    class Renamed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = make_net()

    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(4\): body.0.weight.*unexpected keys \(4\)"):
        load_weights(Renamed(), path, key="network")
    assert load_weights(make_net(), path) is not None  # the only network-like entry ("network") is picked
    torch.save({"student": net.state_dict(), "teacher": net.state_dict()}, tmp_path / "two.pt")
    with pytest.raises(CheckpointMismatchError, match=r"two.pt holds several objects \['student', 'teacher'\]"):
        load_weights(make_net(), tmp_path / "two.pt")
    # resuming into a different network or a save_dict with a new entry fails at STARTED, naming the file
    other = Engine(lambda e, b: None)
    ResumableCheckpointHandler(tmp_path, {"network": wider}).attach(other)
    with pytest.raises(CheckpointMismatchError, match="checkpoint.pt"):
        other.run([0] * BATCHES_PER_EPOCH, max_epochs=2)
    extra = Engine(lambda e, b: None)
    ResumableCheckpointHandler(tmp_path, {"network": make_net(), "ema": make_net()}).attach(extra)
    with pytest.raises(CheckpointMismatchError, match=r"no state for \['ema'\]"):
        extra.run([0] * BATCHES_PER_EPOCH, max_epochs=2)


def test_load_weights_plain_and_ddp(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        seed_everything(3)
        ddp = torch.nn.parallel.DistributedDataParallel(make_net())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        engine = Engine(lambda e, b: None)
        ResumableCheckpointHandler(tmp_path, {"network": ddp, "optimizer": opt}).attach(engine)
        engine.run([0, 0], max_epochs=1)
    finally:
        dist.destroy_process_group()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["objects"]["network"]
    assert not any(k.startswith("module.") for k in saved)
    plain = load_weights(make_net(), tmp_path / "checkpoint.pt", key="network")
    assert all(torch.equal(a, b) for a, b in zip(ddp.module.parameters(), plain.parameters()))
    # a DDP-style state_dict file ("module." keys) loads into a plain network
    torch.save({f"module.{k}": v for k, v in plain.state_dict().items()}, tmp_path / "model.pt")
    again = load_weights(make_net(), tmp_path / "model.pt", map_location="cpu")
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), plain.parameters()))


@pytest.mark.parametrize("guard_first", [True, False])
def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, guard_first):
    engine, loader, net, handler = make_run(0, tmp_path / "c", interval_iterations=1, nan_at=4)
    NaNGuard(checkpoint_dir=str(tmp_path / "c")).attach(engine)
    if guard_first:  # move the guard before the checkpoint handler; by default it runs after it
        handlers = engine._event_handlers[Events.ITERATION_COMPLETED]
        handlers.insert(0, handlers.pop())
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at iteration 4 \(epoch 1\).*learning rate"):
        engine.run(loader, max_epochs=2)
    assert saved_iteration(tmp_path / "c" / "checkpoint.pt") == 3


def test_nan_guard_holds_even_when_exceptions_are_swallowed(tmp_path):
    engine, loader, net, handler = make_run(0, tmp_path, interval_iterations=1, nan_at=2)
    NaNGuard().attach(engine)
    swallowed = []
    engine.add_event_handler(Events.EXCEPTION_RAISED, lambda _, e: swallowed.append(e))
    engine.run(loader, max_epochs=2)
    assert isinstance(swallowed[0], NonFiniteLossError) and engine.state.iteration == 2
    assert saved_iteration(tmp_path / "checkpoint.pt") == 1  # neither iteration 2 nor the epoch end were saved


def test_nan_guard_checks_parameters():
    net = make_net()
    engine = Engine(lambda e, b: {"loss": torch.tensor(1.0)})
    NaNGuard(networks={"net": net}, check_parameters=True).attach(engine)

    @engine.on(Events.ITERATION_STARTED(once=3))
    def poison(_):
        with torch.no_grad():
            net[0].weight[0, 0] = float("inf")

    with pytest.raises(NonFiniteLossError, match=r"net\.0\.weight at iteration 3"):
        engine.run([0] * 5, max_epochs=1)


def test_save_dict_validation(tmp_path):
    plain_loader = torch.utils.data.DataLoader(list(range(4)))  # no random transform: nothing to save, accepted
    assert ResumableCheckpointHandler(tmp_path, {"network": make_net(), "data": plain_loader}).transforms == {
        "data": []
    }
    with pytest.raises(TypeError, match=r"\['weights'\]"):
        ResumableCheckpointHandler(tmp_path, {"network": make_net(), "weights": torch.zeros(2)})


def test_loss_value_reads_monai_decollated_output():
    from common.engines.guards import is_finite, loss_value

    nan = torch.tensor(float("nan"))
    assert loss_value([{"loss": nan, "pred": 0}, {"loss": nan}]) is nan and not is_finite(nan)
    assert loss_value({"loss": 2.0}) == 2.0 and loss_value(torch.tensor(1.0)) == 1.0 and loss_value([]) is None
