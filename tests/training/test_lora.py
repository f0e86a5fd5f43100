"""A saved adapter draws what the adapter drew in memory, from either file, at any alpha."""

import numpy as np
import pytest
import torch

from dreambooth.config import TrainingSettings
from dreambooth.models import LORA_WEIGHTS, SINGLE_FILE_LORA, load_pipeline
from dreambooth.training.lora import add_lora_adapters, save_lora_adapter


@pytest.mark.parametrize("family, encoders", [("sd", ["text_encoder"]), ("sdxl", ["text_encoder", "text_encoder_2"])])
def test_an_adapter_at_alpha_twice_its_rank_loads_at_the_scale_it_trained_at(tmp_path, family, encoders):
    settings = TrainingSettings(method="lora", train_text_encoder=True, lora={"rank": 4, "alpha": 8})
    trained = load_pipeline(f"tiny://{family}")
    add_lora_adapters(trained.unet, [getattr(trained, name) for name in encoders], settings)
    with torch.no_grad():  # as if trained: the up-projections start at zero
        for module in [trained.unet, *(getattr(trained, name) for name in encoders)]:
            for name, weight in module.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    draw = dict(prompt="a dog", num_inference_steps=2, height=64, width=64, output_type="np")
    expected = trained(**draw, generator=torch.Generator().manual_seed(0)).images[0]
    save_lora_adapter(trained, {"unet": trained.unet, **{name: getattr(trained, name) for name in encoders}}, tmp_path, True)

    for weight_name in (LORA_WEIGHTS, SINGLE_FILE_LORA):
        loaded = load_pipeline(f"tiny://{family}")
        loaded.load_lora_weights(tmp_path, weight_name=weight_name)
        image = loaded(**draw, generator=torch.Generator().manual_seed(0)).images[0]
        assert np.abs(image - expected).max() < 1e-4, weight_name
