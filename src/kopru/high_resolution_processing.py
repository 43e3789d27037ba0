"""Pixels for the high-resolution modes: the image as the plan (`kopru.geometry.plan_image`) says, resized,
padded, cut into tiles and normalised by the encoder's own `ImagePreprocessor`, plus the tensors that go with
the pixels (Llama-3.2-Vision's `aspect_ratio_ids` / `aspect_ratio_mask`).

anyres (LLaVA-NeXT) and dynamic (Qwen2-VL) are `HighResolutionPreprocessor`'s; tiled (Llama-3.2-Vision) is
`TiledPreprocessor`'s, steps 3 and 4 of `kopru.geometry.tiles`: the image pasted at the top left of its canvas,
padded with zeros (black) at the bottom and right, cut into tiles row by row. Every size comes from
`kopru.geometry`; nothing here computes one.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from transformers import PretrainedConfig

from kopru.config import KopruConfig
from kopru.geometry import ImagePlan, TileLayout, max_tiles, plan_image, tile_layout
from kopru.image_processing import _RESAMPLE, ImagePreprocessor
from kopru.vision import vision_config_of

MLLAMA_RESAMPLE = Image.Resampling.BILINEAR  # MllamaImageProcessor's default when a config names none


# ------------------------------------------------------------------------------------------- anyres, dynamic
class HighResolutionPreprocessor:
    """Pixels for anyres and dynamic resolution; normalisation is the encoder's own `ImagePreprocessor`.

    anyres (as HF's LlavaNextImageProcessor): the whole image squashed to the tile size first, then the image
    resized to fit the best pinpoint keeping its aspect ratio, padded with black symmetrically and cut into
    tiles row by row -> `pixel_values` [images, 1 + most tiles, 3, tile, tile], zero tiles after an image's own.
    dynamic: the image resized to its `smart_resize` size -> [images, 3, tallest, widest], zero padded at the
    bottom and right. tiled: Llama-3.2-Vision's tiles (`TiledPreprocessor`) -> [images, max_tiles,
    3, tile, tile]. All return `image_sizes` [images, 2] = the original (height, width), from which the model
    re-plans every image.
    """

    def __init__(self, base: ImagePreprocessor, config: KopruConfig, encoder_config: PretrainedConfig) -> None:
        if config.resolution.mode == "fixed":
            raise ValueError("HighResolutionPreprocessor serves resolution modes 'anyres', 'dynamic' and 'tiled', "
                             "found 'fixed'")
        self.base = base
        self.config = config
        self.encoder_config = vision_config_of(encoder_config)
        self.tiled = None
        if config.resolution.mode == "tiled":  # Mllama's canvas, resize, pad and split (kopru.geometry.tiles)
            self.tiled = TiledPreprocessor(base, self.encoder_config.image_size, max_tiles(self.encoder_config))

    def plan(self, image: Image.Image) -> ImagePlan:
        return plan_image(self.config, self.encoder_config, image.height, image.width)

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        for image in images:
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected a PIL.Image.Image, found {type(image).__name__}")
        if self.tiled is not None:
            return self.tiled(images)  # pixel_values [images, max_tiles, 3, S, S] and image_sizes
        sizes = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long).view(-1, 2)
        if self.config.resolution.mode == "anyres":
            per_image = [self._anyres(image.convert("RGB")) for image in images]
        else:
            per_image = [self._dynamic(image.convert("RGB")) for image in images]
        return {"pixel_values": pad_stack(per_image), "image_sizes": sizes}

    def _resample(self) -> Image.Resampling:
        return self.base.resample_filter

    def _anyres(self, image: Image.Image) -> torch.Tensor:
        plan = self.plan(image)
        tile = plan.pass_size[0]
        best_height, best_width = plan.layout.best_resolution
        # Resize to fit the pinpoint keeping the aspect ratio, then pad with black: HF's get_patch_output_size,
        # float arithmetic included, so that the pixels equal HF's.
        scale_width, scale_height = best_width / image.width, best_height / image.height
        if scale_width < scale_height:
            new_width, new_height = best_width, min(math.ceil(image.height * scale_width), best_height)
        else:
            new_height, new_width = best_height, min(math.ceil(image.width * scale_height), best_width)
        canvas = Image.new("RGB", (best_width, best_height))
        canvas.paste(image.resize((new_width, new_height), self._resample()),
                     ((best_width - new_width) // 2, (best_height - new_height) // 2))
        views = [image.resize((tile, tile), self._resample())]
        views += [canvas.crop((left, top, left + tile, top + tile))
                  for top in range(0, best_height, tile) for left in range(0, best_width, tile)]
        return torch.stack([self.base.normalize(view) for view in views])

    def _dynamic(self, image: Image.Image) -> torch.Tensor:
        height, width = self.plan(image).pass_size
        return self.base.normalize(image.resize((width, height), self._resample()))


def pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack tensors of equal rank, zero padding every dimension at its end to the largest."""
    if not tensors:
        return torch.empty(0)
    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors), strict=True)]
    out = tensors[0].new_zeros(len(tensors), *shape)
    for index, tensor in enumerate(tensors):
        out[(index, *(slice(0, n) for n in tensor.shape))] = tensor
    return out


# ----------------------------------------------------------------------------------------------------- tiled
def aspect_ratio_inputs(layouts: list[TileLayout], max_tiles: int, device: torch.device | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the encoder's `aspect_ratio_ids` [images] and `aspect_ratio_mask` [images, max_tiles]."""
    for index, layout in enumerate(layouts):
        if layout.num_tiles > max_tiles:
            raise ValueError(f"image {index} is laid out in {layout.tiles[0]}x{layout.tiles[1]} = {layout.num_tiles} "
                             f"tiles; expected at most max_tiles = {max_tiles}")
    ids = torch.tensor([layout.aspect_ratio_id for layout in layouts], dtype=torch.long, device=device)
    tiles = torch.tensor([layout.num_tiles for layout in layouts], dtype=torch.long, device=device)
    mask = (torch.arange(max_tiles, device=device) < tiles.unsqueeze(1)).long()
    return ids, mask


def batch_aspect_ratio_inputs(layouts_per_sample: list[list[TileLayout]], max_tiles: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's batch layout: `aspect_ratio_ids` [batch, max images] (0 pads) and `aspect_ratio_mask`
    [batch, max images, max_tiles] (tile 0 set even for padding images, as HF's `build_aspect_ratio_mask`)."""
    most = max((len(layouts) for layouts in layouts_per_sample), default=0)
    ids = torch.zeros(len(layouts_per_sample), most, dtype=torch.long)
    mask = torch.zeros(len(layouts_per_sample), most, max_tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    for row, layouts in enumerate(layouts_per_sample):
        if layouts:
            ids[row, :len(layouts)], mask[row, :len(layouts)] = aspect_ratio_inputs(layouts, max_tiles)
    return ids, mask


def split_to_tiles(canvas: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """[C, rows * S, columns * S] -> [rows * columns, C, S, S], tiles row by row (HF's `split_to_tiles`)."""
    channels, height, width = canvas.shape
    tile_height, tile_width = height // rows, width // columns
    tiles = canvas.view(channels, rows, tile_height, columns, tile_width).permute(1, 3, 0, 2, 4)
    return tiles.reshape(rows * columns, channels, tile_height, tile_width)


class TiledPreprocessor:
    """Images -> Mllama tiles. `base` supplies the per-tile normalisation and the resampling filter; the tile
    size is the encoder's `tile_size`, the tile count at most `max_tiles` (the encoder's `max_num_tiles`, which
    is also how many tiles every image is padded to: the encoder's reshapes assume it)."""

    def __init__(self, base: ImagePreprocessor, tile_size: int, max_tiles: int) -> None:
        self.base = base
        self.tile_size = tile_size
        self.max_tiles = max_tiles

    def layout(self, image: Image.Image) -> TileLayout:
        return tile_layout(image.height, image.width, self.tile_size, self.max_tiles)

    def tiles(self, image: Image.Image) -> torch.Tensor:
        """One image -> its own tiles [rows * columns, 3, S, S], normalised."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, found {type(image).__name__}")
        image = image.convert("RGB")
        layout = self.layout(image)
        height, width = layout.resized
        resample = _RESAMPLE.get(self.base.resample, MLLAMA_RESAMPLE)
        canvas = Image.new("RGB", (layout.canvas[1], layout.canvas[0]))  # zero pixels; HF pads with 0 before
        canvas.paste(image.resize((width, height), resample), (0, 0))  # rescaling, i.e. black, normalised
        return split_to_tiles(self.base.normalize(canvas), *layout.tiles)

    def __call__(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Köprü's layout: `pixel_values` [images, max_tiles, 3, S, S] (zero tiles after an image's own) and
        `image_sizes` [images, 2] = original (height, width), from which the model re-plans every image."""
        pixels = torch.zeros(len(images), self.max_tiles, 3, self.tile_size, self.tile_size)
        for index, image in enumerate(images):
            tiles = self.tiles(image)
            pixels[index, :tiles.shape[0]] = tiles
        sizes = torch.tensor([[image.height, image.width] for image in images], dtype=torch.long).view(-1, 2)
        return {"pixel_values": pixels, "image_sizes": sizes}

    def hf_inputs(self, images_per_sample: list[list[Image.Image]]) -> dict[str, torch.Tensor]:
        """HF's `MllamaImageProcessor` layout for a batch: `pixel_values` [batch, max images, max_tiles, 3, S, S],
        `aspect_ratio_ids` [batch, max images], `aspect_ratio_mask` [batch, max images, max_tiles]."""
        most = max((len(images) for images in images_per_sample), default=0)
        pixels = torch.zeros(len(images_per_sample), most, self.max_tiles, 3, self.tile_size, self.tile_size)
        for row, images in enumerate(images_per_sample):
            if images:
                pixels[row, :len(images)] = self(images)["pixel_values"]
        ids, mask = batch_aspect_ratio_inputs([[self.layout(image) for image in images]
                                               for images in images_per_sample], self.max_tiles)
        return {"pixel_values": pixels, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}
