"""The training loss the trainer optimises and logs, in-process with a tiny GPT.

(a) ``train/loss`` is the token-weighted mean over the global batch -- sum of the per-token losses of all its
micro-batches / their loss tokens -- not the mean of the micro-batch means, and the gradient DeepSpeed applies is
the gradient of that token-weighted loss. (b) The losses reach the host once per logged step.
"""
import json
import os
import sys
from collections import Counter

import pytest
import torch
from helpers import perturb

from megatron_ext.training.gpt_task import GPTTask
from megatron_ext.training.trainer import Trainer

_TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", "model.seq_length=16",
    "model.make_vocab_size_divisible_by=8", "model.micro_batch_size=2", "model.global_batch_size=4",
    "trainer.val_check_interval=0", "trainer.accelerator=cpu", "exp_manager.create_tensorboard_logger=false",
    "exp_manager.create_checkpoint_callback=false", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
]
# plain SGD with lr 1, no clipping, decay, momentum or schedule: one step moves every weight by -gradient
_SGD = ["model.optim.name=sgd", "model.optim.lr=1.0", "model.optim.weight_decay=0.0", "trainer.gradient_clip_val=0"]
_SEQ = 16
_HARD = 2  # loss tokens per sample of the first micro-batch (the second counts all _SEQ)


def _cfg(exp_dir, *extra):
    from megatron_ext.config.loader import load_config

    return load_config(overrides=[*_TINY, f"exp_manager.exp_dir={exp_dir}", *extra])


class _UnequalTokensTask(GPTTask):
    """A GPT task over fixed random samples whose two micro-batches per step carry different numbers of loss tokens:
    the first (samples 0, 1 of every 4) counts ``_HARD`` tokens per sample, whose labels are made the least likely
    token under the initial model (a large per-token loss); the second counts all ``_SEQ`` tokens (random labels).
    The mean of the two micro-batch means therefore differs clearly from the token-weighted mean. Keeps an
    untrained twin of the model (``initial``)."""

    samples: list

    def build_datasets(self, num_samples):
        g = torch.Generator().manual_seed(0)
        vocab = self.tokenizer.vocab_size
        self.samples = []
        for i in range(max(num_samples[0], 4)):
            toks = torch.randint(0, vocab, (_SEQ + 1,), generator=g)
            mask = torch.zeros(_SEQ)
            mask[: (_HARD if i % 4 < 2 else _SEQ)] = 1.0
            self.samples.append({"tokens": toks[:-1], "labels": toks[1:].clone(), "loss_mask": mask,
                                 "position_ids": torch.arange(_SEQ)})
        return self.samples, None, None

    def build_model(self):
        # the same weights as the model trained (built from trainer.seed), spread out so that losses differ
        self.initial = perturb(super().build_model(), scale=1.0)
        model = perturb(super().build_model(), scale=1.0)
        with torch.no_grad():
            for i, s in enumerate(self.samples):
                if i % 4 < 2:
                    logits = model.gather_logits(model(s["tokens"][None]))[0]
                    s["labels"][:_HARD] = logits[:_HARD].argmin(dim=-1)
        return model


def _per_token(model, samples):
    """Per-token losses [n, seq] and loss masks of ``samples`` under ``model``."""
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    return model(tokens, labels=labels), torch.stack([s["loss_mask"] for s in samples])


@pytest.fixture(scope="module")
def one_thread():
    from megatron_ext.parallel.state import initialize_parallel

    initialize_parallel(1, 1, accelerator="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_loss_is_token_weighted_over_the_global_batch(one_thread, tmp_path):
    tasks = []

    def factory(cfg, device):
        tasks.append(_UnequalTokensTask(cfg, device))
        return tasks[-1]

    res = Trainer(_cfg(tmp_path, "trainer.max_steps=1", "trainer.log_every_n_steps=1", *_SGD), factory).fit()
    task = tasks[0]
    logged = [r["train/loss"] for r in _metrics(res["run_dir"]) if "train/loss" in r]
    assert len(logged) == 1 and res["train_loss"] == logged[0]

    ref = task.initial.train()
    per_token, mask = _per_token(ref, task.samples[:4])
    assert mask[:2].sum() == 2 * _HARD and mask[2:].sum() == 2 * _SEQ  # unequal loss-token counts
    token_weighted = (per_token * mask).sum() / mask.sum()
    micro_means = [(per_token[i:i + 2] * mask[i:i + 2]).sum() / mask[i:i + 2].sum() for i in (0, 2)]
    mean_of_means = (micro_means[0] + micro_means[1]) / 2
    assert logged[0] == pytest.approx(token_weighted.item(), rel=1e-5)
    assert abs(mean_of_means.item() - token_weighted.item()) > 0.1 * token_weighted.item()  # clearly different

    # the SGD step (lr 1) moved each weight by minus the gradient of the token-weighted loss
    token_weighted.backward()
    trained = dict(task.model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p.detach() - trained[name].detach(), p.grad, rtol=1e-4, atol=1e-6, msg=name)


_SYNCS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__")


class _SyncCounter:
    """Counts host synchronisations through ``torch.Tensor`` methods while active, by the megatron_ext file (or
    'other') that made them."""

    def __init__(self, monkeypatch):
        self.counts: Counter = Counter()
        self.active = False
        root = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["megatron_ext"].__file__)))
        for name in _SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), root))

    def _wrap(self, original, root):
        def counted(tensor, *args, **kwargs):
            if self.active:
                f = sys._getframe(1)
                while f is not None and not f.f_code.co_filename.startswith(os.path.join(root, "megatron_ext")):
                    f = f.f_back
                self.counts[os.path.relpath(f.f_code.co_filename, root) if f is not None else "other"] += 1
            return original(tensor, *args, **kwargs)

        return counted


@pytest.mark.parametrize("clip", [0, 0.5])
def test_losses_reach_the_host_once_per_logged_step(one_thread, tmp_path, monkeypatch, clip):
    """6 steps of 2 micro-batches, logged at steps 1 (the first), 3 and 6. Counted from the first step's start to the
    end of the loop (not the set-up before it): three host syncs from the trainer, task and loss function -- one per
    logged step, each checking the losses of every step since the last one and carrying the logged step's grad norm
    (``engine.install_fp32_clipping`` leaves it on the device, and clips there too) -- and none on the other
    steps."""
    counter = _SyncCounter(monkeypatch)
    synced = []
    train_step, train_loop, sync = Trainer._train_step, Trainer._train_loop, Trainer._sync

    def counting_step(self, *args, **kwargs):
        counter.active = True
        return train_step(self, *args, **kwargs)

    def counting_loop(self, *args, **kwargs):
        try:
            return train_loop(self, *args, **kwargs)
        finally:
            counter.active = False

    def recording_sync(self, pending, extras, lr):
        synced.append([s for s, _ in pending])
        return sync(self, pending, extras, lr)

    monkeypatch.setattr(Trainer, "_train_step", counting_step)
    monkeypatch.setattr(Trainer, "_train_loop", counting_loop)
    monkeypatch.setattr(Trainer, "_sync", recording_sync)
    sgd = [o for o in _SGD if not o.startswith("trainer.gradient_clip_val")]
    res = Trainer(_cfg(tmp_path, "trainer.max_steps=6", "trainer.log_every_n_steps=3", *sgd,
                       f"trainer.gradient_clip_val={clip}"),
                  _UnequalTokensTask).fit()
    assert res["step"] == 6
    assert [r["step"] for r in _metrics(res["run_dir"]) if "train/loss" in r] == [1, 3, 6]
    assert synced == [[1], [2, 3], [4, 5, 6]]  # every step's loss reaches the host, in one copy per logged step
    assert sum(counter.counts.values()) == 3, dict(counter.counts)  # the grad norm travels in the same copy


def test_nonfinite_loss_is_caught_at_the_next_logged_step_naming_its_step(one_thread, tmp_path):
    """Logged every 3 steps: the loss of step 1 is finite (it is logged), the overflowing update makes step 2's
    loss nan, and the sync at step 3 stops the run naming step 2."""
    from megatron_ext.errors import MegatronExtError

    with pytest.raises(MegatronExtError, match="training loss is nan at step 2 "):
        Trainer(_cfg(tmp_path, "trainer.max_steps=6", "trainer.log_every_n_steps=3", "model.optim.lr=1e39"),
                _UnequalTokensTask).fit()
