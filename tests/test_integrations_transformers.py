"""fastclip inside Hugging Face transformers: CLIPModel / SiglipModel patched against unpatched (loss, gradients,
outputs), and attn_implementation="fastclip" against SDPA, with small random configs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastclip.nn  # noqa: E402
from fastclip.integrations import transformers as fc_transformers  # noqa: E402

from .helpers import assert_close  # noqa: E402

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def _config(kind):
    if kind == "siglip2":
        return transformers.Siglip2Config(text_config=dict(TOWER, vocab_size=99, max_position_embeddings=16),
                                          vision_config=dict(TOWER, num_patches=16, patch_size=8))
    if kind == "clip":
        return transformers.CLIPConfig(text_config=dict(TOWER, vocab_size=99, max_position_embeddings=16),
                                       vision_config=dict(TOWER, image_size=32, patch_size=8), projection_dim=16)
    return transformers.SiglipConfig(text_config=dict(TOWER, vocab_size=99, max_position_embeddings=16),
                                     vision_config=dict(TOWER, image_size=32, patch_size=8))


def _model(kind):
    cls = dict(clip=transformers.CLIPModel, siglip=transformers.SiglipModel, siglip2=transformers.Siglip2Model)[kind]
    torch.manual_seed(0)
    model = cls(_config(kind)).double()
    with torch.no_grad():  # trained-like scale (100 for CLIP) and a bias, so confident logits are tested
        model.logit_scale.fill_(4.6 if kind == "clip" else 2.3)
        if kind != "clip":
            model.logit_bias.fill_(-3.0)
    return model


def _inputs(kind, n=7, seq=12):
    ids = torch.randint(1, 99, (n, seq))
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[1, 8:] = 0  # padded texts
    mask[4, 5:] = 0
    if kind == "clip":  # CLIP pools at the highest token id (EOS): put it at each text's end
        ids[mask == 0] = 0
        ids[torch.arange(n), mask.sum(1) - 1] = 99 - 1
    if kind == "siglip2":  # patches as the processor gives them: (n, 16 patches, 3 * 8 * 8), a 4 x 4 grid
        pixels = torch.randn(n, 16, 3 * 8 * 8, dtype=torch.float64)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                    pixel_attention_mask=torch.ones(n, 16, dtype=torch.long), spatial_shapes=torch.tensor([[4, 4]] * n))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(n, 3, 32, 32, dtype=torch.float64))


def _run(model, inputs, **kw):
    out = model(**inputs, return_loss=True, **kw)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    return out, grads


@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_patched_loss_and_gradients(kind, monkeypatch):
    """fastclip's loss from the embeddings: the model's own value and every parameter's gradient; never the
    logits (the loss functions transformers uses are made to fail)."""
    inputs = _inputs(kind)
    model = _model(kind)
    expect, expect_grads = _run(model, inputs)
    fc_transformers.patch(model, attention=False, backend="torch")
    module = transformers.models.clip.modeling_clip if kind == "clip" else None
    if module is not None:  # the loss is not computed from the logits any more
        monkeypatch.setattr(module, "image_text_contrastive_loss", lambda *a: pytest.fail("logits used for the loss"))
    else:
        monkeypatch.setattr(torch.nn.functional, "logsigmoid", lambda *a: pytest.fail("logits used for the loss"))
    got, grads = _run(model, inputs)
    assert_close("loss", got.loss.detach(), expect.loss.detach(), rtol=1e-12, atol=1e-12)
    assert list(got.keys()) == list(expect.keys())
    assert_close("logits", got.logits_per_image.detach(), expect.logits_per_image.detach(), rtol=0, atol=0)
    for (name, _), g, e in zip(model.named_parameters(), grads, expect_grads):
        assert (g is None) == (e is None), name
        if g is not None:
            assert_close(name, g, e, rtol=1e-10, atol=1e-12)
    as_tuple = model(**inputs, return_loss=True, return_dict=False)
    assert_close("tuple loss", as_tuple[0].detach(), expect.loss.detach(), rtol=1e-12, atol=1e-12)
    assert model(**inputs).loss is None
    with pytest.raises(RuntimeError, match="already patched"):
        fc_transformers.patch(model)
    fc_transformers.unpatch(model)
    assert "forward" not in vars(model)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_attention_matches_sdpa(kind, monkeypatch):
    """attn_implementation="fastclip": the outputs and gradients of "sdpa", and the kernel actually runs (causal with
    padding for CLIP's text tower, padding-free bidirectional for SigLIP's, no mask for the vision towers)."""
    calls = []
    real = fc_transformers.flash_attention
    monkeypatch.setattr(fc_transformers, "flash_attention",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    inputs = _inputs(kind)
    model = _model(kind)
    model.set_attn_implementation("sdpa")
    expect, expect_grads = _run(model, inputs)
    fc_transformers.patch(model, backend="torch")
    assert model.config._attn_implementation == "fastclip"
    got, grads = _run(model, inputs)
    assert_close("loss", got.loss.detach(), expect.loss.detach(), rtol=1e-10, atol=1e-12)
    assert_close("text", got.text_embeds.detach(), expect.text_embeds.detach(), rtol=1e-10, atol=1e-12)
    assert_close("image", got.image_embeds.detach(), expect.image_embeds.detach(), rtol=1e-10, atol=1e-12)
    for (name, _), g, e in zip(model.named_parameters(), grads, expect_grads):
        if g is not None:
            assert_close(name, g, e, rtol=1e-9, atol=1e-11)
    # 2 vision layers (no mask), 2 text layers (padding; causal for CLIP), all fused
    assert sorted((c["causal"], c["key_padding_mask"] is not None) for c in calls) == (
        [(False, False)] * 2 + [(kind == "clip", True)] * 2)


def test_attention_function_falls_back_to_sdpa():
    """What the kernel does not cover is transformers' SDPA function, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64) for _ in range(3))
    additive = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    sliding = torch.ones(6, 6, dtype=torch.bool).tril().triu(-2)[None, None].expand(2, 1, 6, 6)
    for mask in (additive, sliding):
        out, _ = fc_transformers.attention_forward(module, q, k, v, mask, scaling=0.3)
        assert torch.equal(out, sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0])
    module.num_key_value_groups = 2  # grouped-query heads
    out, _ = fc_transformers.attention_forward(module, q, k[:, :2], v[:, :2], None)
    assert torch.equal(out, sdpa_attention_forward(module, q, k[:, :2], v[:, :2], None)[0])


def test_patch_refuses_models_without_its_loss():
    model = transformers.CLIPTextModelWithProjection(_config("clip").text_config)
    with pytest.raises(TypeError, match="loss=False"):
        fc_transformers.patch(model)
    fc_transformers.patch(model, loss=False)
    assert model.config._attn_implementation == "fastclip"


def test_from_pretrained_with_fastclip_attention(tmp_path):
    """register(): attn_implementation="fastclip" is accepted where transformers takes one, down to the towers."""
    fc_transformers.register()
    _model("siglip").save_pretrained(tmp_path)
    model = transformers.SiglipModel.from_pretrained(tmp_path, attn_implementation="fastclip")
    assert model.text_model.config._attn_implementation == model.vision_model.config._attn_implementation == "fastclip"
