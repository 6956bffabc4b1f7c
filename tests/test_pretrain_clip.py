"""The demo-CLIP pre-training script: a few steps of a tiny model, then the written file loads back."""
from __future__ import annotations

import json

import pytest
import torch

from weclip_infer.backbone import FrozenCLIP, load_clip
from weclip_infer.config import BackboneConfig
from weclip_infer.demo import pretrain_clip as pc
from weclip_infer.text import tokenize

_SHORT = ["--tiny", "--steps", "2", "--batch-size", "4", "--eval-zs", "4", "--eval-cam", "2", "--eval-every", "0",
          "--threads", "1", "--workers", "0", "--dtype", "fp32"]


def _short_run(out, *extra: str) -> tuple[dict, dict]:
    """Two seeded steps on the tiny model: (trained weights, provenance)."""
    res = pc.main(_SHORT + ["--out", str(out), *extra])
    assert res["steps"] == 2
    state = {k: v.detach().clone() for k, v in res["clip"].state_dict().items()}
    return state, json.loads((out / "provenance.json").read_text())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory):
    """The plain contrastive run and the run with the token-level loss, which the ablation switches
    are compared against (each switch must change what is trained)."""
    root = tmp_path_factory.mktemp("short_runs")
    return {"plain": _short_run(root / "plain"), "token": _short_run(root / "token", "--token-loss", "1.0")}


@pytest.mark.slow
def test_short_runs_are_deterministic(short_runs, tmp_path):
    """Same arguments, same weights: the differences the switch tests look for come from the switches."""
    again, _ = _short_run(tmp_path, "--token-loss", "1.0")
    assert _same(again, short_runs["token"][0])


@pytest.mark.slow
def test_token_loss_switch_changes_training(short_runs):
    (plain, _), (token, prov) = short_runs["plain"], short_runs["token"]
    assert not _same(plain, token)
    assert prov["token_loss"] == 1.0 and "MIL" in prov["loss"]


@pytest.mark.slow
def test_attention_loss_switch_changes_training(short_runs, tmp_path):
    state, prov = _short_run(tmp_path, "--token-loss", "1.0", "--attn-loss", "1.0", "--attn-blocks", "2")
    assert not _same(state, short_runs["token"][0])
    assert prov["attn_blocks"] == 2 and "attention" in prov["loss"]


@pytest.mark.slow
def test_prompt_loss_switch_changes_training(short_runs, tmp_path):
    state, prov = _short_run(tmp_path, "--token-loss", "1.0", "--prompt-loss", "1.0")
    assert not _same(state, short_runs["token"][0])
    assert "background-prompts" in prov["loss"]
    with pytest.raises(SystemExit):  # the prompt loss needs the token-level loss
        pc.main(["--tiny", "--steps", "1", "--out", str(tmp_path / "x"), "--prompt-loss", "1.0"])


@pytest.mark.slow
def test_object_style_switch_trains_on_that_world(short_runs, tmp_path):
    state, prov = _short_run(tmp_path, "--token-loss", "1.0", "--object-style", "badge", "--badge-scale", "0.4", "0.5")
    assert not _same(state, short_runs["token"][0])  # other pixels, same layouts and captions
    assert prov["world"]["object_style"] == "badge" and prov["world"]["badge_scale"] == [0.4, 0.5]


def test_positive_matrix_and_loss():
    a, b = frozenset({0}), frozenset({1, 2})
    pos = pc.positive_matrix([a, b, a], [0, 0, 1], [a, None, None], [0, 0, 1])
    # caption 0 "red circle on grass": image 0 only; caption 1 "grass.": images 0, 1; caption 2 "sand.": image 2
    assert pos.tolist() == [[True, True, False], [False, True, False], [False, False, True]]
    img = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(10.0)
    matched = pc.multi_positive_clip_loss(img, img, scale, pos)
    swapped = pc.multi_positive_clip_loss(img, img.roll(1, 0), scale, pos)  # captions moved to other images
    assert 0 < matched < swapped
    # with an all-true target every caption is right for every image: the loss cannot tell them apart
    all_pos = torch.ones(3, 3, dtype=torch.bool)
    torch.testing.assert_close(pc.multi_positive_clip_loss(img, img, scale, all_pos),
                               pc.multi_positive_clip_loss(img, img.roll(1, 0), scale, all_pos))


def test_world_token_ids_cover_prompts():
    ids = set(pc.world_token_ids(32))
    for text in ["a clean origami red circle.", "a photo of a purple star and a black diamond on snow.", "dirt."]:
        assert set(tokenize([text], 32)[0].tolist()) <= ids
    assert {49406, 49407} <= ids


def test_short_run_writes_loadable_clip(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "demo_clip"
    res = pc.main(["--tiny", "--steps", "3", "--batch-size", "6", "--eval-zs", "8", "--eval-cam", "2",
                   "--eval-every", "0", "--threads", "1", "--workers", "0", "--dtype", "fp32", "--out", str(out)])
    path = out / "clip.safetensors"
    assert path.is_file() and (out / "pretrain_log.csv").is_file()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["steps"] == 3 and prov["patch_stem"] == "conv" and prov["model_cfg"] == pc.TINY_MODEL_CFG
    for k in ("zero_shot_top1", "cam_miou", "pseudo_label_miou", "all_background_miou", "versions", "command"):
        assert k in prov
    assert path.stat().st_size < 1_000_000  # pruned token table

    trained = res["clip"].eval()
    loaded = load_clip(BackboneConfig(clip_weights=str(path)))
    assert FrozenCLIP(loaded).patch_size == 16
    x = torch.randn(2, 3, 64, 64)
    tok = tokenize(["a clean origami red circle.", "a photo of a blue square on sand."], 32)
    with torch.no_grad():
        assert torch.equal(trained.encode_image(x), loaded.encode_image(x))
        t_a, t_b = trained.encode_text(tok), loaded.encode_text(tok)
        # the kept rows are exact; bitwise equality may differ by kernel choice
        assert (t_a - t_b).abs().max() < 1e-5, (t_a - t_b).abs().max()
        assert torch.equal(trained.logit_scale, loaded.logit_scale)
    # FrozenCLIP (WeCLIP's forward) sees the same pooled embedding as open_clip's avg-pool tower
    fb = FrozenCLIP(loaded)
    feats, _, _ = fb.forward_features(x, num_blocks=fb.num_blocks, need_attn=False)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(loaded.encode_image(x), dim=-1)
    assert torch.allclose(fb.pooled_embedding(feats[-1]), ref, atol=1e-5)


def test_fp16_storage_loads_as_float(tmp_path):
    torch.manual_seed(0)
    clip = pc.build_clip(pc.TINY_MODEL_CFG, seed=0).eval()
    ids = pc.world_token_ids(32)
    pc.save_outputs(clip, tmp_path, pc.TINY_MODEL_CFG, ids, "fp16", {"note": "test"})
    loaded = load_clip(BackboneConfig(clip_weights=str(tmp_path / "clip.safetensors")))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    tok = tokenize(["a clean origami pink heart."], 32)
    with torch.no_grad():
        a, b = clip.encode_text(tok), loaded.encode_text(tok)
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2)


def test_value_tokens_equal_self_attention_only_output():
    """The value path equals the last block's attention output when each token may attend only to itself."""
    torch.manual_seed(0)
    clip = pc.build_clip(pc.TINY_MODEL_CFG, 0).eval()
    v = clip.visual
    blk = v.transformer.resblocks[-1]
    x = torch.randn(2, 17, v.class_embedding.shape[0])
    L = x.shape[1]
    only_self = torch.full((L, L), float("-inf"))
    only_self.fill_diagonal_(0.0)
    a = blk.ln_1(x)
    with torch.no_grad():
        out, _ = blk.attn(a, a, a, attn_mask=only_self, need_weights=False)
        ref = v.ln_post(out[:, 1:]) @ v.proj
        got = pc.value_tokens(clip, x)
    assert got.shape == (2, L - 1, v.proj.shape[1])
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_token_mil_loss_rewards_local_tokens():
    K = len(pc.label_prompts())
    t = torch.eye(K, 16)  # orthogonal prompt embeddings
    y = torch.zeros(1, K)
    y[0, [2, K - 1]] = 1.0  # class 2 on the last background
    good = torch.stack([t[K - 1]] * 6 + [t[2]] * 2)[None]  # some tokens are the object, the rest background
    only_bg = torch.stack([t[K - 1]] * 8)[None]  # the object's evidence is nowhere
    wrong = torch.stack([t[K - 1]] * 6 + [t[3]] * 2)[None]  # an absent class wins tokens
    lg, lb, lw = (pc.token_mil_loss(z, t, y) for z in (good, only_bg, wrong))
    assert lg < 0.01 and lb > 5 * lg and lw > lb
    z = good.clone().requires_grad_(True)
    pc.token_mil_loss(z + 0.1 * torch.randn_like(z), t, y).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_head_mean_attention_matches_multihead_attention_weights():
    torch.manual_seed(0)
    clip = pc.build_clip(pc.TINY_MODEL_CFG, 0).eval()
    blk = clip.visual.transformer.resblocks[-1]
    x = torch.randn(2, 17, clip.visual.class_embedding.shape[0])
    a = blk.ln_1(x)
    with torch.no_grad():
        _, ref = blk.attn(a, a, a, need_weights=True, average_attn_weights=True)
        got = pc.head_mean_attention(blk, x)
    assert torch.allclose(got, ref, atol=1e-6), (got - ref).abs().max()


def test_attention_affinity_loss_prefers_grouping_attention():
    # 8 patches (+CLS): tokens 0-5 predict the background prompt, 6-7 the object prompt
    q = torch.zeros(1, 8, 3)
    q[0, :6, 0] = 1.0
    q[0, 6:, 1] = 1.0
    same = (q @ q.transpose(1, 2))[0]
    grouped = torch.zeros(1, 9, 9)
    grouped[0, 1:, 1:] = same / same.sum(-1, keepdim=True)
    grouped[0, 0] = 1.0 / 9
    uniform = torch.full((1, 9, 9), 1.0 / 9)
    crossed = torch.zeros(1, 9, 9)  # object tokens attend to the background and vice versa
    crossed[0, 1:, 1:] = (1 - same) / (1 - same).sum(-1, keepdim=True)
    lg, lu, lc = (pc.attention_affinity_loss(a, q) for a in (grouped, uniform, crossed))
    assert lg < 1e-5 and lu > 0.3 and lc > lu
    logits = torch.zeros(1, 9, 9, requires_grad=True)
    pc.attention_affinity_loss(logits.softmax(-1), q).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_prompt_vs_background_loss_prefers_present_class_over_backgrounds():
    n_cls, n_bg = len(pc.CLASS_NAMES), len(pc.BACKGROUND_NAMES)
    txt = torch.eye(n_cls + n_bg, 16)
    y = torch.zeros(2, n_cls + n_bg)
    y[0, 2] = y[0, n_cls + 1] = 1  # class 2 on background 1
    y[1, 0] = y[1, 5] = y[1, n_cls] = 1
    good = torch.stack([txt[2], txt[0] + txt[5]])  # the image embeddings point at their classes
    bad = torch.stack([txt[n_cls + 1], txt[n_cls]])  # ... or at their backgrounds
    scale = torch.tensor(10.0)
    lg, lb = pc.prompt_vs_background_loss(good, txt, y, scale), pc.prompt_vs_background_loss(bad, txt, y, scale)
    assert lg < 0.1 < 5.0 < lb
    assert float(pc.prompt_vs_background_loss(good, txt, torch.zeros_like(y), scale)) == 0.0  # no present class
    img = bad.clone().requires_grad_()
    pc.prompt_vs_background_loss(img, txt, y, scale).backward()
    assert img.grad[0, 2] < 0  # descending the loss moves image 0 towards its class prompt


@pytest.mark.parametrize("name,style", [("demo", "flat"), ("demo-badge", "badge")])
def test_builtin_demo_clips_load_offline_and_name_their_world(name, style):
    """Each built-in small CLIP loads by name (no network) and classifies single-object images of
    the world it was trained on well above chance (8 classes: 12.5%)."""
    from weclip_infer.backbone import BUILTIN_WEIGHTS, FrozenCLIP
    from weclip_infer.demo.world import SPLIT_OFFSETS, WorldConfig, generate_sample
    from weclip_infer.text import text_embeddings

    prov = json.loads((BUILTIN_WEIGHTS[name].parent / "provenance.json").read_text())
    assert prov["world"].get("object_style", "flat") == style
    clip = load_clip(BackboneConfig(clip_weights=name))
    bb = FrozenCLIP(clip)
    cfg = WorldConfig(size=128, object_style=style, single_object_prob=1.0)
    samples = [generate_sample(11, SPLIT_OFFSETS["test"] + k, cfg) for k in range(1, 25)]
    x = pc.normalize_batch([s.image for s in samples])
    temb = text_embeddings(bb, list(pc.CLASS_PROMPTS), ["a clean origami {}."])
    with torch.no_grad():
        feats, _, _ = bb.forward_features(x, num_blocks=bb.num_blocks, need_attn=False)
        pred = (bb.pooled_embedding(feats[-1]) @ temb.t()).argmax(1)
    acc = (pred == torch.tensor([s.classes[0] for s in samples])).float().mean().item()
    assert acc >= 0.75, acc
