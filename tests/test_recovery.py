"""Loss recovered: the three conditions against independent splices, on tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlrw.model.sparse import SparseCoder, SparseCoderConfig
from nlrw.model.subject import load_subject, next_token_loss, splice
from nlrw.recovery import loss_recovered, zero_ablation
from support import LAYER, MLP, ids, save_tiny

torch.set_num_threads(1)  # tiny models: a second thread only adds contention


def random_coder(kind: str, d: int, seed: int = 0) -> SparseCoder:
    cfg = SparseCoderConfig(
        kind=kind, d_in=d, d_out=d, num_latents=64, k=4, skip_connection=kind == "transcoder"
    )  # pyright: ignore[reportArgumentType]
    coder = SparseCoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return coder.eval()


@pytest.mark.parametrize(("arch", "kind"), [("llama", "transcoder"), ("neox", "sae")])
def test_conditions_match_independent_splices(tmp_path: Path, arch: str, kind: str) -> None:
    subject = load_subject(save_tiny(tmp_path, arch), dtype="float32", device="cpu")
    hookpoint = (MLP if kind == "transcoder" else LAYER)[arch].format(1)
    coder = random_coder(kind, subject.model.config.hidden_size)
    windows = ids(batch=5, seq=10)
    result = loss_recovered(subject, coder, hookpoint, windows, batch_size=2)

    def source(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y if kind == "sae" else x).reshape(-1, x.shape[-1])

    def shaped(f):
        return lambda x, y: f(source(x, y)).reshape(y.shape)

    clean = float(next_token_loss(subject.model, windows))
    with splice(subject.model, hookpoint, shaped(coder)):
        tc = float(next_token_loss(subject.model, windows))
    with splice(subject.model, hookpoint, shaped(lambda r: zero_ablation(coder, r))):
        zero = float(next_token_loss(subject.model, windows))
    assert result.n_tokens == 5 * 9
    assert result.ce_clean == pytest.approx(clean, rel=1e-5)
    assert result.ce_transcoder == pytest.approx(tc, rel=1e-5)
    assert result.ce_zero == pytest.approx(zero, rel=1e-5)
    assert result.ce_transcoder != pytest.approx(result.ce_clean, rel=1e-4)
    assert result.loss_recovered == pytest.approx(1 - (tc - clean) / (zero - clean), rel=1e-4)


def test_zero_ablation_keeps_skip_and_decoder_bias() -> None:
    coder = random_coder("transcoder", 8)
    x = torch.randn(3, 8)
    assert coder.W_skip is not None
    torch.testing.assert_close(zero_ablation(coder, x), coder.b_dec + x @ coder.W_skip.T)


def test_bad_windows_are_refused(tmp_path: Path) -> None:
    subject = load_subject(save_tiny(tmp_path), dtype="float32", device="cpu")
    coder = random_coder("transcoder", subject.model.config.hidden_size)
    with pytest.raises(ValueError, match=r"non-empty \[n, ctx_len >= 2\]"):
        loss_recovered(subject, coder, MLP["llama"].format(1), torch.zeros(3, 1, dtype=torch.long))
