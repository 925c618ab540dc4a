import torch

from aurora_pet.fusion import FusionSite, GatedQueryTransformation, InformativeContextEnhancement

from .test_model import perturb, wrap
from .toy import toy_inputs


def randomised(site: FusionSite) -> FusionSite:
    with torch.no_grad():
        for parameter in site.parameters():
            parameter.normal_()
    return site


def test_identity_at_initialisation():
    fused, text = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    torch.testing.assert_close(FusionSite(8, ice=True, gqt=True)(fused, text, None), fused, rtol=0, atol=0)


def test_equations():
    torch.manual_seed(0)
    fused, text = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    ice = randomised(FusionSite(8, ice=True, gqt=False)).ice
    context = torch.softmax(fused @ text.transpose(1, 2) / 8**0.5, -1) @ text
    torch.testing.assert_close(ice(fused, text, None), fused + ice.alpha * context)
    gqt = randomised(FusionSite(8, ice=False, gqt=True)).gqt
    query = gqt.gamma * text + gqt.beta
    gate = torch.sigmoid(torch.cat([fused, query], -1) @ gqt.gate.weight.T + gqt.gate.bias)
    torch.testing.assert_close(gqt(fused, text), fused + gate * query)
    assert isinstance(ice, InformativeContextEnhancement) and isinstance(gqt, GatedQueryTransformation)


def test_only_the_samples_own_unmasked_tokens_are_used():
    torch.manual_seed(0)
    site = randomised(FusionSite(8, ice=True, gqt=True)).eval()
    fused, text = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    mask = torch.zeros(3, 1, 1, 5)
    mask[:, ..., 3:] = -10000.0
    out = site(fused, text, mask)
    text2 = text.clone()
    text2[:, 3:] = torch.randn(3, 2, 8)  # change padded tokens only
    torch.testing.assert_close(site(fused, text2, mask)[:, :3], out[:, :3])
    # no batch statistics: a sample's output does not depend on the other samples in the batch
    torch.testing.assert_close(site(fused[:1], text[:1], mask[:1]), out[:1])
    site.train()
    torch.testing.assert_close(site(fused, text, mask), out)  # same in training and evaluation


def test_causal_mask_keeps_future_tokens_out():
    torch.manual_seed(0)
    site = randomised(FusionSite(8, ice=True, gqt=True))
    fused, text = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    causal = torch.triu(torch.full((4, 4), -10000.0), diagonal=1)[None, None]
    out = site(fused, text, causal)
    text2 = text.clone()
    text2[:, 2:] = torch.randn(1, 2, 8)
    torch.testing.assert_close(site(fused, text2, causal)[:, :2], out[:, :2])


def test_sites_hook_into_cross_attention_and_switch_off():
    model, reference = wrap(ice=True, gqt=False, target_modules=["qkv"], modules_to_save=[])
    assert model.fusion_sites == ["blocks.0.crossattention", "blocks.1.crossattention"]
    assert model.parameter_report()["groups"]["gqt"] == 0
    perturb(model)
    inputs = toy_inputs()
    with torch.no_grad():
        model.aurora_factors.V.zero_()  # factors contribute nothing: any change is ICE's
    assert not torch.allclose(model(*inputs), reference(*inputs))
    with model.disable_adapter():
        torch.testing.assert_close(model(*inputs), reference(*inputs))
