"""The graphed step (``train.graph``, ``training.graphed``) against the eager trainer.

Off CUDA the static-buffer step runs eagerly (what the CPU tests check: the same data, the same update up
to float rounding); the tests marked ``gpu`` capture it as a CUDA graph and replay it. ``benchmarks/gpu_check.sh``
runs this file on a GPU machine (without the suite's conftest: only torch and training/ are needed).
"""

import pytest
import torch
import torch.nn.functional as F

from training import Callback, RunConfig, train
from training.callbacks import DIAGNOSTICS
from training.checkpoint import load_checkpoint
from training.core import epoch_seed, seeded_model
from training.data import Batches, load_splits
from training.diagnostics import model_diagnostics
from training.graphed import StaticBatches, StaticStep, momentum_buffers
from training.packed import train_packed
from training.regularizers import SparseSGD, draw_masks

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TIMING = {"epoch_seconds", "images_per_second"}
# 20 steps of batch 50 on 1,000 digits; the lr steps down at 8, weight decay steps up at 12, masks are drawn at 15
CHANGES = {8: ("lr", 0.2), 12: ("wd", 5e-3), 15: ("masks", 0.5)}  # lr: a factor


class Stop(Exception):
    pass


class StopAfter(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, metrics):
        if epoch == self.epoch:
            raise Stop()


def rel(a, b):
    """||a - b|| / ||b|| (Euclidean)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def twenty_steps(device, dtype, graphed, lr=0.1, **data):
    """Parameters, momentum and BN statistics after 20 steps, eager (SparseSGD) or through StaticStep."""
    config = RunConfig(arch="resnet8", **{"dataset": "digits", **data}, seed=3, train_subset=1000, label_noise=0.1)
    split, _ = load_splits(config, device)
    batches = Batches(split, config.dataset, 50, augment=True)
    model = seeded_model(config).to(device=device, dtype=dtype, memory_format=torch.channels_last).train()
    params = list(model.parameters())
    opt = SparseSGD(params, momentum=0.9)
    wd = 1e-4
    masks = None
    generator = torch.Generator().manual_seed(epoch_seed(config.seed, 1))

    def loss_of(x, y):
        logits = model(x.to(dtype))
        loss = F.cross_entropy(logits, y)
        return loss, [loss.detach() * len(y)]

    sums = [torch.zeros((), device=device, dtype=dtype)]
    static = None
    if graphed:
        static = StaticStep(params, 0.9, momentum_buffers(opt.optimizer, params), loss_of, sums,
                            StaticBatches(batches, len(split), 50, torch.device(device)), torch.device(device),
                            state=list(model.buffers()))
        static.batches.load(batches.draw(generator))
        static.set_hyper(lr, wd)
        data = None
    else:
        opt.set_hyper(lr, wd)
        data = batches.epoch(generator)
    for i in range(20):
        if i in CHANGES:
            what, value = CHANGES[i]
            if what == "lr":
                lr = lr * value
            elif what == "wd":
                wd = value
            else:
                masks = draw_masks(params, value, seed=11)
            if graphed:
                static.set_hyper(lr, wd)
                if what == "masks":
                    static.set_masks(masks)
            else:
                opt.set_hyper(lr, wd)
                if what == "masks":
                    opt.set_masks(masks)
        if graphed:
            static.step_once()
        else:
            x, y = next(data)
            loss, stats = loss_of(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums[0] += stats[0]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    buffers = [opt.optimizer.state[p]["momentum_buffer"].clone() for p in params]
    return state, buffers, sums[0].item(), masks


def assert_twenty_steps_agree(device, dtype, lr, tolerance, momentum_tolerance, **data):
    eager, eager_bufs, eager_loss, masks = twenty_steps(device, dtype, False, lr, **data)
    static, static_bufs, static_loss, _ = twenty_steps(device, dtype, True, lr, **data)
    assert static_loss == pytest.approx(eager_loss, rel=tolerance)
    floats = [k for k in eager if not k.endswith("num_batches_tracked")]
    assert all(int(static[k]) == int(eager[k]) == 20 for k in eager if k not in floats)
    flat = lambda state: torch.cat([state[k].reshape(-1) for k in floats])  # noqa: E731
    assert rel(flat(static), flat(eager)) <= tolerance  # all weights and BN statistics, as one vector
    assert rel(torch.cat([b.reshape(-1) for b in static_bufs]), torch.cat([b.reshape(-1) for b in eager_bufs])) \
        <= momentum_tolerance
    # the frozen entries did not move after the redraw: their momentum is zero in both
    for m, a, b in zip(masks, static_bufs, eager_bufs):
        assert not a[m.to(a.device) == 0].any() and not b[m.to(b.device) == 0].any()


# float64 at lr 0.1 checks the arithmetic (the same update up to rounding of ~1e-16). In float32, 20 steps at
# lr 0.1 amplify rounding chaotically (eager float32 vs eager float64: 36% apart in the first convolution),
# so float32 is checked at lr 0.01.
# (dtype, lr, bound on loss sum and weights, bound on momentum, a gradient and so the noisiest); measured on the
# CPU: float64 1e-14 / 5e-13 / 3e-12, float32 3e-5 / 7e-4 / 6e-2 (all as ||a - b|| / ||b||).
TOLERANCES = [(torch.float64, 0.1, 1e-9, 1e-9), (torch.float32, 0.01, 1e-2, 0.25)]


@pytest.mark.parametrize("dtype, lr, tolerance, momentum_tolerance", TOLERANCES)
def test_the_static_step_is_the_eager_step_over_20_steps(dtype, lr, tolerance, momentum_tolerance):
    """LR step, weight-decay step and a mask redraw change tensors the step reads, with the eager numbers."""
    torch.set_num_threads(1)
    assert_twenty_steps_agree("cpu", dtype, lr, tolerance, momentum_tolerance)


def test_the_static_step_is_the_eager_step_on_fashion_mnist_1x28x28(fashion_files, tmp_path):
    """The same 20 steps on one-channel 28x28 images (the real files), in float64."""
    torch.set_num_threads(1)
    dtype, lr, tolerance, momentum_tolerance = TOLERANCES[0]
    assert_twenty_steps_agree("cpu", dtype, lr, tolerance, momentum_tolerance, dataset="fashion-mnist",
                              data_dir=str(tmp_path))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, lr, tolerance, momentum_tolerance", TOLERANCES)
def test_the_graphed_step_is_the_eager_step_over_20_steps_on_cuda(dtype, lr, tolerance, momentum_tolerance):
    assert_twenty_steps_agree("cuda", dtype, lr, tolerance, momentum_tolerance)


# 97 images: every epoch ends on a partial batch (run eagerly)
SMALL = dict(arch="resnet8", dataset="digits", train_subset=97, label_noise=0.1, lr=[0.1, 0.05, 0.02],
             epochs_per_step=(1,), weight_decay=[1e-4, 1e-3, 2e-3], grad_sparsity=[0.0, 0.5, 0.5])


def without_timing(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def assert_graphed_run_resumes_identically(device, tmp_path):
    config = RunConfig(seed=1, graph=True, **SMALL)
    assert config.identity_dict() == config.replace(graph=False).identity_dict()  # a speed option, not the run
    whole = train(config, device=device)
    path = tmp_path / "c.pt"
    with pytest.raises(Stop):
        train(config, [StopAfter(1)], device=device, checkpoint_path=path)  # before the lr, wd and mask change
    resumed = train(config, device=device, checkpoint_path=path)
    assert resumed.resumed_from == 1
    assert without_timing(resumed.history) == without_timing(whole.history)
    for (key, a), b in zip(resumed.model.state_dict().items(), whole.model.state_dict().values()):
        assert torch.equal(a, b), key
    # the diagnostics read the weights the static step trained (97 images at batch 50: 2 steps an epoch)
    last = model_diagnostics(whole.model.named_parameters(), lr=0.02, weight_decay=2e-3, momentum=0.9,
                             steps_per_epoch=2)
    assert {k: whole.history[-1][k] for k in DIAGNOSTICS} == last
    return whole


def test_a_graphed_run_resumes_to_identical_state_and_trains_as_the_eager_one(tmp_path):
    torch.set_num_threads(1)
    whole = assert_graphed_run_resumes_identically("cpu", tmp_path)
    eager = train(RunConfig(seed=1, **SMALL))
    for g, e in zip(whole.history, eager.history):
        assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)
        assert g["updated_fraction"] == pytest.approx(e["updated_fraction"], abs=1e-3)
    state = load_checkpoint(tmp_path / "c.pt")
    assert state["epoch"] == 3 and len(state["masks"]) == len(list(eager.model.parameters()))


@gpu
@pytest.mark.gpu
def test_a_graphed_run_resumes_to_identical_state_on_cuda(tmp_path):
    assert_graphed_run_resumes_identically("cuda", tmp_path)


def assert_graphed_pack_is_the_eager_pack(device):
    configs = [RunConfig(seed=s, **SMALL) for s in (1, 2)]
    eager = train_packed(configs, device=device)
    graphed = train_packed([c.replace(graph=True) for c in configs], device=device)
    for a, b in zip(graphed.members, eager.members):
        for g, e in zip(a.history, b.history):
            assert g["train_loss"] == pytest.approx(e["train_loss"], rel=1e-3)
            assert g["test_loss"] == pytest.approx(e["test_loss"], rel=1e-2)
            assert g["updated_fraction"] == pytest.approx(e["updated_fraction"], abs=1e-3)


def test_a_graphed_pack_trains_as_the_eager_pack():
    torch.set_num_threads(1)
    assert_graphed_pack_is_the_eager_pack("cpu")


@gpu
@pytest.mark.gpu
def test_a_graphed_pack_trains_as_the_eager_pack_on_cuda():
    assert_graphed_pack_is_the_eager_pack("cuda")
