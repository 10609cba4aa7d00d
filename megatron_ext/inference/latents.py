"""Latent-space tools for trained encoder-decoder models with a hiddens module (MIM / VAE), and without one.

    from megatron_ext.inference.latents import LatentTools
    lt = LatentTools.from_checkpoint("experiments/megatron_mim/RUN/checkpoints")
    z = lt.encode(["To be, or not to be"])              # {"z": [S, B, H] (mean), "z_sample", "mask", ...}
    lt.decode(z["z"])                                    # greedy text
    lt.decode(z["z_sample"], greedy=False, top_p=0.9)    # sampled text
    lt.sample_prior(4)                                   # z ~ N(0, I), decoded
    lt.interpolate("first text", "second text", steps=5)
    lt.reconstruction_accuracy("heldout.txt")            # teacher-forced token accuracy + greedy exact match

The decoder reads the hiddens module's ``enc_output`` (``model.hiddens.enc_output_name``, e.g. ``z``). ``encode``
returns the posterior mean (``z_mean`` when the transform gives one, which is also what the model decodes from
at evaluation) and a reparameterized sample ``z_mean + exp(z_logvar / 2) * eps``. Without a Gaussian transform
the latent is the encoder output itself (``z_sample`` = ``z``).

Texts longer than ``model.seq_length`` tokens are an error (never silently cut) unless ``truncate=True``.
Checkpoints: whatever :func:`megatron_ext.checkpoint.loader.load_model` loads -- a run directory, its
``checkpoints`` or one ``step_N`` of any TP / PP / ZeRO layout, or a ``.mext`` archive -- holding an
encoder-decoder; the model is built at TP=1 in this process.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch

from megatron_ext.checkpoint.loader import load_model
from megatron_ext.errors import CheckpointError, DataError
from megatron_ext.inference.encdec_generation import generate_from_memory

log = logging.getLogger("megatron_ext")


class LatentTools:
    def __init__(self, model, tokenizer, *, device: Optional[torch.device] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        self.seq_length = int(model.config.seq_length)
        hm = getattr(model, "hiddens_module", None)
        self.enc_output_name = getattr(hm, "enc_output_name", "hiddens") if hm is not None else "hiddens"

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu") -> "LatentTools":
        loaded = load_model(path, map_location=device)
        if loaded.family != "encdec":
            raise CheckpointError(f"{path} holds a {loaded.family} model, not an encoder-decoder (latent tools need "
                                  f"model.encoder / model.decoder)")
        log.info("loaded %s (step %s)", loaded.info.get("checkpoint", path), loaded.info.get("step"))
        return cls(loaded.model.float(), loaded.tokenizer, device=torch.device(device))

    # ------------------------------------------------------------------ helpers
    def _batch(self, texts: Sequence[str], truncate: bool = False):
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings")
        ids = [self.tokenizer.tokenize(t) for t in texts]
        for i, t in enumerate(ids):
            if len(t) > self.seq_length:
                if not truncate:
                    raise DataError(f"text {i} has {len(t)} tokens, more than model.seq_length={self.seq_length} "
                                    f"(pass truncate=True to cut it)")
                ids[i] = t[: self.seq_length]
        n = max(1, max((len(t) for t in ids), default=1))
        enc = torch.full((len(ids), n), self.tokenizer.pad, dtype=torch.long)
        mask = torch.zeros(len(ids), n, dtype=torch.bool)
        for i, t in enumerate(ids):
            enc[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            mask[i, : len(t)] = True
        return enc.to(self.device), mask.to(self.device), ids

    def _bos(self) -> int:
        bos = getattr(self.tokenizer, "bos", None)
        return int(bos if bos is not None else self.tokenizer.eod)

    def _eos(self) -> int:
        eos = getattr(self.tokenizer, "eos", None)
        return int(eos if eos is not None else self.tokenizer.eod)

    def _banned(self) -> List[int]:
        out = [int(self.tokenizer.pad)]
        mask = getattr(self.tokenizer, "mask", None)
        if mask is not None:
            out.append(int(mask))
        if self._bos() != self._eos():
            out.append(self._bos())
        return out

    # ------------------------------------------------------------------ API
    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, generator: Optional[torch.Generator] = None,
               truncate: bool = False) -> Dict[str, torch.Tensor]:
        """Texts -> ``{"z": mean latents [S, B, H], "z_sample": one posterior sample, "mask": [B, S], and the
        hiddens module's other outputs (z_mean, z_logvar, ...)}``."""
        enc, mask, _ = self._batch(texts, truncate)
        return self._encode_batch(enc, mask, generator)

    def _encode_batch(self, enc: torch.Tensor, mask: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        outs = self.model.encode_latents(enc, mask)
        z = outs["enc_output"]
        out = {k: v for k, v in outs.items() if torch.is_tensor(v)}
        out["mask"] = outs["enc_output_mask"]
        if "z_mean" in outs and "z_logvar" in outs:
            mean, logvar = outs["z_mean"], outs["z_logvar"]
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            out["z"] = mean
            out["z_sample"] = mean + torch.exp(0.5 * logvar) * eps
        else:
            out["z"] = z
            out["z_sample"] = z
        return out

    @torch.no_grad()
    def decode(self, z: torch.Tensor, mask: Optional[torch.Tensor] = None, *, greedy: bool = True,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 256,
               generator: Optional[torch.Generator] = None) -> List[str]:
        """Latents ``[S, B, H]`` -> texts (greedy, or sampled with temperature / top-k / top-p)."""
        ids = generate_from_memory(self.model, z.to(self.device), None if mask is None else mask.to(self.device),
                                   bos=self._bos(), eos=self._eos(), max_new_tokens=max_new_tokens, greedy=greedy,
                                   temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                   banned_ids=self._banned())
        return [self.tokenizer.detokenize(t) for t in ids]

    def latent_steps(self) -> int:
        steps = getattr(self.model, "latent_steps", None)
        if steps:
            return int(steps)
        raise DataError("the encoder's output length depends on the input (transformer encoder); sampling from the "
                        "prior needs a fixed-size latent (model.encoder.arch=perceiver)")

    @torch.no_grad()
    def sample_prior(self, n: int, *, generator: Optional[torch.Generator] = None, **decode_kwargs):
        """``n`` latents from N(0, I) (shape [hidden_steps, n, H]) and their decoded texts."""
        z = torch.randn(self.latent_steps(), int(n), self.model.hidden_size, generator=generator)
        return z, self.decode(z, **decode_kwargs)

    @torch.no_grad()
    def interpolate(self, text_a: str, text_b: str, steps: int = 5, **decode_kwargs) -> List[str]:
        """Decode ``(1 - t) z_a + t z_b`` for ``steps`` values of t from 0 to 1 (posterior means)."""
        if steps < 2:
            raise ValueError(f"steps={steps}: expected >= 2")
        za, zb = self.encode([text_a])["z"], self.encode([text_b])["z"]
        if za.shape != zb.shape:
            raise DataError(f"the two texts give latents of shapes {tuple(za.shape)} and {tuple(zb.shape)}; "
                            f"interpolation needs a fixed-size latent (perceiver encoder)")
        ts = torch.linspace(0, 1, steps)
        z = torch.cat([(1 - t) * za + t * zb for t in ts], dim=1)
        return self.decode(z, **decode_kwargs)

    @torch.no_grad()
    def reconstruction_accuracy(self, path_or_texts, *, max_lines: int = 200, batch_size: int = 16,
                                greedy_decode: bool = True, truncate: bool = True) -> Dict[str, float]:
        """Reconstruct held-out lines from their posterior-mean latents: teacher-forced token accuracy (decoder
        fed the true prefix) and, with ``greedy_decode``, the exact-match rate and the token accuracy of greedy
        decoding (position by position). ``teacher_forced_token_accuracy_other_latent`` decodes every line from the
        latent of another line (fixed-size latents only): the gap to the first figure is what the latent carries.
        ``path_or_texts``: a text file (one document per line) or a list."""
        if isinstance(path_or_texts, str):
            with open(path_or_texts, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        else:
            texts = [t for t in path_or_texts if t.strip()]
        texts = texts[:max_lines]
        if not texts:
            raise DataError("no non-empty lines to reconstruct")
        tf_correct = tf_total = gd_correct = gd_total = exact = sh_correct = 0
        for i in range(0, len(texts), batch_size):
            chunk = texts[i: i + batch_size]
            enc, mask, ids = self._batch(chunk, truncate)
            ids = [t[: self.seq_length - 1] for t in ids]  # room for eos on the decoder side
            lat = self._encode_batch(enc, mask)
            z, zmask = lat["z"], lat["mask"]
            n = max(len(t) for t in ids) + 1
            dec = torch.full((len(ids), n), self.tokenizer.pad, dtype=torch.long)
            lab = torch.full((len(ids), n), -1, dtype=torch.long)
            for j, t in enumerate(ids):
                seq = [self._bos()] + t
                dec[j, : len(seq)] = torch.tensor(seq)
                lab[j, : len(t) + 1] = torch.tensor(t + [self._eos()])
            logits = self.model.gather_logits(self.model.decode(dec.to(self.device), z, zmask))
            pred = logits.argmax(-1).cpu()
            valid = lab >= 0
            tf_correct += int(((pred == lab) & valid).sum())
            tf_total += int(valid.sum())
            if len(chunk) > 1 and getattr(self.model, "latent_steps", None):
                # the same, decoding each line from ANOTHER line's latent: how much the latent itself carries
                zs, ms = z.roll(1, dims=1), zmask.roll(1, dims=0)
                pred_s = self.model.gather_logits(self.model.decode(dec.to(self.device), zs, ms)).argmax(-1).cpu()
                sh_correct += int(((pred_s == lab) & valid).sum())
            if greedy_decode:
                outs = self.decode(z, zmask, max_new_tokens=n)
                for t, o in zip(ids, outs):
                    o_ids = self.tokenizer.tokenize(o)
                    exact += int(o_ids == t)
                    gd_correct += sum(int(a == b) for a, b in zip(o_ids, t))
                    gd_total += len(t)
        res = {"lines": float(len(texts)), "teacher_forced_token_accuracy": tf_correct / max(tf_total, 1)}
        if sh_correct:
            res["teacher_forced_token_accuracy_other_latent"] = sh_correct / max(tf_total, 1)
        if greedy_decode:
            res["greedy_exact_match"] = exact / len(texts)
            res["greedy_token_accuracy"] = gd_correct / max(gd_total, 1)
        return res


__all__ = ["LatentTools"]
