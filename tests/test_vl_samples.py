"""Vision-language samples (data_tools/vl_samples.py) against the model's image docking: slots are used, each image
docks into its own slots, and the loss never counts image slots or markers."""
import numpy as np
import pytest
import torch

from data_tools.vl_samples import VLIds, build_vl_sample, collate_vl, load_image

IDS = VLIds(bos=1, eos=2, pad=3, image=5, image_end=6)


@pytest.fixture(scope="module")
def vl_model():
    from pretrain.config import preset
    from pretrain.model.metalm import MetaLM
    from pretrain.parallel import init_distributed, init_model_parallel

    init_distributed("gloo")
    init_model_parallel(1, 1)
    torch.manual_seed(0)
    cfg = preset("tiny-vl", vocab_size=300, max_seq_length=96)
    return MetaLM(cfg).eval(), cfg


def image(seed, size=32):
    return np.random.default_rng(seed).standard_normal((3, size, size)).astype(np.float32)


def test_loss_mask_counts_caption_and_eos_only():
    s = build_vl_sample([40, 41, 42], n_images=2, slots=4, T=24, ids=IDS)
    labels, mask = s["labels"], s["loss_mask"]
    counted = labels[mask == 1].tolist()
    assert counted == [40, 41, 42, IDS.eos]
    assert not set(labels[mask == 1]) & {IDS.image, IDS.image_end}
    # the slots: 2 images x 4 slots, each image's slots contiguous after its <image> marker
    dst = s["image_dst"].tolist()
    assert dst == [2, 3, 4, 5, 8, 9, 10, 11]
    assert all(s["tokens"][d - 1] == IDS.image for d in (dst[0], dst[4]))
    assert all(mask[d - 1] == 0 and mask[d] == 0 for d in dst)  # no target is a slot, none predicted from one
    with pytest.raises(ValueError, match="more than T=8"):
        build_vl_sample([40] * 5, n_images=1, slots=4, T=8, ids=IDS)


def test_image_slots_are_used_and_stay_in_their_sample(vl_model):
    model, cfg = vl_model
    S = cfg.image_slots()
    a = build_vl_sample([40, 41, 42, 43], 1, S, 40, IDS)
    b = build_vl_sample([50, 51], 1, S, 40, IDS)
    cap = np.flatnonzero(a["loss_mask"] == 1)
    with torch.no_grad():
        base = model.logits(collate_vl([a, b], [image(0), image(1)]))
        other_img = model.logits(collate_vl([a, b], [image(2), image(1)]))
        other_neighbour = model.logits(collate_vl([a, b], [image(0), image(3)]))
    assert (base[0, cap] - other_img[0, cap]).abs().max() > 1e-4, "caption outputs ignore the image"
    assert torch.equal(base[0], other_neighbour[0]), "another sample's image leaked into this one"
    # the loss: gradients reach the vision encoder, never from a slot or marker target
    model.train()
    batch = collate_vl([a, b], [image(0), image(1)])
    loss = model(batch)
    loss.backward()
    assert model.vision.patch.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()


def test_two_images_dock_into_their_own_slots(vl_model):
    model, cfg = vl_model
    S = cfg.image_slots()
    s = build_vl_sample([40, 41, 42], 2, S, 2 * S + 10, IDS)
    first_end = int(s["image_dst"][S - 1]) + 1  # the </image> after the first image
    with torch.no_grad():
        base = model.logits(collate_vl([s], [image(0), image(1)]))
        second = model.logits(collate_vl([s], [image(0), image(5)]))
    # changing the second image leaves everything up to the first image's end untouched (causal decoder), and
    # changes the caption
    assert torch.equal(base[0, :first_end + 1], second[0, :first_end + 1])
    cap = np.flatnonzero(s["loss_mask"] == 1)
    assert (base[0, cap] - second[0, cap]).abs().max() > 1e-4


def test_load_image_is_deterministic_and_normalised():
    import io

    from PIL import Image

    buf = io.BytesIO()
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:5, :, 3] = 255  # top half opaque red, bottom half transparent (composited on white)
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    x = load_image(buf.getvalue(), 16)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    assert np.array_equal(x, load_image(buf.getvalue(), 16))
    from data_tools.vl_samples import MEAN, STD

    white = (1.0 - MEAN) / STD
    assert np.allclose(x[:, -1, -1], white, atol=1e-5)  # transparent -> white
    red = (np.array([1.0, 0.0, 0.0], dtype=np.float32) - MEAN) / STD
    assert np.allclose(x[:, 0, 0], red, atol=1e-5)
