"""Token labeling for ViT-style timm models: a class-token loss on the crop's target plus a
weighted loss of every patch token on its own LabelPooling target (S x S bins of the crop).

The loader yields both: the token targets (sparse, ``output_size=S``) and each crop's S = 1
target (``crop_targets=True``), pooled from the same planned boxes.
"""
from typing import Tuple

import timm
import torch
from torch import nn



class TokenLabelingModel(nn.Module):
    """A timm vision transformer returning (class logits [B, C], patch-token logits
    [B, T, C]); the tokens go through the model's own head (after its fc_norm), as
    TokenLabeling does."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        features = model.forward_features(images)
        tokens = features[:, model.num_prefix_tokens:]
        return model.forward_head(features), model.head(model.head_drop(model.fc_norm(tokens)))


def create_token_model(name: str, *, token_targets: int, image_size: int,
                       **kwargs) -> nn.Module:
    """timm.create_model for images of `image_size` whose patch-token grid is
    token_targets x token_targets.

    Raises:
        SystemExit: Naming the option to change: the model has no patch tokens, or its grid
            at --image-size is not token_targets a side.
    """
    try:
        model = timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError as error:
        raise SystemExit(f"--token-targets needs a ViT-style timm model (patch tokens, "
                         f"img_size=); --model {name} is not one ({error})") from error
    needed = ("forward_features", "forward_head", "num_prefix_tokens", "patch_embed", "head",
              "head_drop", "fc_norm")
    missing = [attribute for attribute in needed if not hasattr(model, attribute)]
    if missing:
        raise SystemExit(f"--token-targets needs a ViT-style timm model; --model {name} has "
                         f"no {', '.join(missing)}")
    height, width = model.patch_embed.grid_size
    if (height, width) != (token_targets, token_targets):
        hint = (f"pass --token-targets {height}" if height == width else
                "use a square token grid")
        raise SystemExit(f"--token-targets {token_targets}: --model {name} at --image-size "
                         f"{image_size} has a {height} x {width} token grid; {hint}")
    return model
