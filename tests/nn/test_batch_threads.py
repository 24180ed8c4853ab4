"""Batch threads (nn/batch_threads.py): the batch's rows split over CPU threads give the
one-thread loss and gradients (float64: to 1e-12 relative, the sums run per share and then
across shares), repeat bitwise for a thread count, and leave the thread settings as found."""

from __future__ import annotations

import numpy as np
import pytest

from mpipar import backend
from mpipar.nn.batch_threads import BatchThreads
from mpipar.nn.gpt import GPT, PRESETS

CONFIG = PRESETS["tiny"].replace(n_layer=2, block_size=16)


@pytest.fixture
def threads():
    def use(n):
        backend.set_cpu_threads(n)
    yield use
    backend.set_cpu_threads(1)


def batch(B, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, CONFIG.vocab_size, (B, CONFIG.block_size)),
            rng.integers(0, CONFIG.vocab_size, (B, CONFIG.block_size)))


def reference(B, dloss=1.0):
    model = GPT(CONFIG, dtype="float64")
    loss, grads = model.loss_and_grads(*batch(B), dloss=dloss)
    return loss, model.grad_buffer.copy()


@pytest.mark.parametrize("n, B", [(2, 4), (3, 5), (4, 3)])   # even, uneven, more threads than rows
def test_shares_give_the_one_thread_loss_and_gradients(threads, n, B):
    want_loss, want = reference(B, dloss=0.5)
    model = GPT(CONFIG, dtype="float64")
    threads(n)
    loss, grads = BatchThreads(model).loss_and_grads(*batch(B), dloss=0.5)
    assert grads is model.grads
    assert abs(loss - want_loss) < 1e-12 * abs(want_loss)
    np.testing.assert_allclose(model.grad_buffer, want, rtol=1e-12, atol=1e-15)


def test_repeats_bitwise_and_accumulates(threads):
    model = GPT(CONFIG, dtype="float64")
    threads(3)
    runner = BatchThreads(model)
    runner.loss_and_grads(*batch(5))
    once = model.grad_buffer.copy()
    runner.loss_and_grads(*batch(5))
    assert np.array_equal(model.grad_buffer, once)           # zeroed, same bits again
    runner.loss_and_grads(*batch(5), accumulate=True)
    np.testing.assert_allclose(model.grad_buffer, 2 * once, rtol=1e-12, atol=1e-15)


def test_replicas_share_the_parameters_not_the_gradients(threads):
    model = GPT(CONFIG, dtype="float64")
    threads(2)
    runner = BatchThreads(model)
    runner.loss_and_grads(*batch(4))
    twin = runner.replicas[1]
    assert twin.param_buffer is model.param_buffer
    assert all(np.shares_memory(twin.params[k], model.params[k]) for k in model.params)
    assert not np.shares_memory(twin.grad_buffer, model.grad_buffer)
    model.param_buffer *= 0.5                                # an optimiser step: both see it
    np.testing.assert_array_equal(twin.params["transformer.wpe.weight"],
                                  model.params["transformer.wpe.weight"])


def test_thread_settings_are_restored_and_one_thread_is_the_model_itself(threads):
    model = GPT(CONFIG, dtype="float64")
    threads(2)
    BatchThreads(model).loss_and_grads(*batch(4))
    assert backend.cpu_threads() == 2
    if backend.blas_threads() is not None:
        assert backend.blas_threads() == 2
    threads(1)
    want_loss, want = reference(3)
    loss, _ = BatchThreads(model).loss_and_grads(*batch(3))
    assert loss == want_loss and np.array_equal(model.grad_buffer, want)   # no split at all


def test_dropout_follows_the_model_mode(threads):
    model = GPT(CONFIG.replace(dropout=0.5), dtype="float64").eval()
    threads(2)
    runner = BatchThreads(model)
    want_loss, want = GPT(CONFIG.replace(dropout=0.5), dtype="float64").eval().loss_and_grads(
        *batch(4))[0], None
    loss, _ = runner.loss_and_grads(*batch(4))
    assert abs(loss - want_loss) < 1e-12 * abs(want_loss)     # eval: no dropout anywhere
    model.train()
    trained = runner.loss_and_grads(*batch(4))[0]
    assert trained != loss                                    # train: the replicas drop too
    assert runner.replicas[1].state.training


def test_a_bucketed_or_device_model_is_refused(strict_cupy):
    with pytest.raises(ValueError, match="NumPy models only"):
        BatchThreads(GPT(CONFIG, dtype="float32", xp=strict_cupy.xp))
