"""Prompt -> mask prediction on one 2D slice, with the image embedding computed once and cached.

The expensive step (the image encoder) is explicit: :meth:`SamPredictor.set_image` encodes
a slice, or takes its embedding from an in-memory LRU cache keyed by
``(content hash, key, model identity, contrast, encoder size)``; every prompt afterwards
(:meth:`~SamPredictor.predict`) only runs the prompt encoder and the mask decoder.

Conventions (the same as segment-anything's predictor, so prompts and results mean the
same): points ``(N, 2)`` are ``(x, y)`` pixels of the slice given to ``set_image``, labels
1 = foreground / 0 = background, boxes ``XYXY``; ``mask_input`` holds low-resolution logits
``(1, 4h, 4w)`` (``(1, 256, 256)`` for SAM), e.g. ``low_res_logits[i:i+1]`` of an earlier
call; masks come back at the slice's resolution (or at a smaller ``mask_size`` for a cheap
preview, with :meth:`SamPredictor.masks_from_logits` giving a candidate's full-resolution
mask from its low-res logits afterwards). napari's (row, col) is converted in
:mod:`napari_sam.prompts` only.

Speed: the decoder runs through :mod:`napari_sam._fast_decoder` (same numbers, fewer
operations for a few prompt tokens); masks are interpolated once, straight from the valid
part of the low-resolution logits to the slice size (the reference upsamples to
1024 x 1024, crops the padding and resizes again), and thresholded masks interpolate only
along the mask outlines (:mod:`napari_sam._masks`). See docs/performance.md.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from . import _fast_decoder
from ._masks import keep_clicked_parts, upsample_binary, upsample_logits
from .preprocess import Contrast, ResizeLongestSide, check_slice, resize_to_input, to_uint8_rgb
from .prompts import check_boxes, check_points

#: Default byte budget of the in-memory embedding cache (256 SAM embeddings of 4 MiB).
DEFAULT_CACHE_BYTES = 1 << 30

#: Test-time augmentation: the (left-right, up-down) flips of the views of each slice, by
#: number of views. Every view is encoded; prompts are flipped into each view and the
#: views' low-res logits and predicted IoUs are averaged (docs/models.md).
TTA_VIEWS = {
    1: ((False, False),),
    2: ((False, False), (True, False)),
    4: ((False, False), (True, False), (False, True), (True, True)),
}


@dataclass(eq=False)
class Embedding:
    """The image embedding of one slice and the geometry needed to use it.

    Attributes:
        features: (V, C, h, w) float32 image embedding (C = 256, h = w = 64 for SAM) of
            the V views (:data:`TTA_VIEWS`; V = 1 without test-time augmentation, and
            ``features[:1]`` is always the slice as it is).
        original_size: (H, W) of the slice given to ``set_image``.
        input_size: (h', w') of the resized slice before padding
            (``ResizeLongestSide.get_preprocess_shape(H, W, img_size)``).
        signature: the cache key this embedding was computed for ("" if unknown).
    """

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    signature: str = ""

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


class EmbeddingCache:
    """Least-recently-used map ``signature -> Embedding`` bounded by total bytes.

    An embedding larger than the whole budget is not stored. ``max_bytes = 0`` disables
    caching. ``hits``/``misses``/``evictions`` count lookups and removals. Thread-safe (a
    worker may fill it while the UI thread reads it).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, Embedding] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, signature: str) -> bool:
        return signature in self._items

    def keys(self) -> list[str]:
        """Signatures from least to most recently used."""
        with self._lock:
            return list(self._items)

    def get(self, signature: str) -> Embedding | None:
        """The cached embedding (now most recently used), or None."""
        with self._lock:
            emb = self._items.get(signature)
            if emb is None:
                self.misses += 1
                return None
            self._items.move_to_end(signature)
            self.hits += 1
            return emb

    def put(self, emb: Embedding) -> None:
        """Store ``emb`` under ``emb.signature``, evicting least recently used entries."""
        sig = emb.signature
        if not sig or emb.nbytes > self.max_bytes:
            return
        with self._lock:
            if sig in self._items:
                self.nbytes -= self._items.pop(sig).nbytes
            self._items[sig] = emb
            self.nbytes += emb.nbytes
            while self.nbytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.nbytes = 0


def content_hash(image: np.ndarray) -> str:
    """blake2b-128 hex digest of an array's bytes, dtype and shape."""
    arr = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _weights_token(model: nn.Module) -> str:
    """Changes whenever a parameter or buffer is replaced or modified in place."""
    state = tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    return f"{hash(state) & 0xFFFFFFFFFFFF:012x}"


class SamPredictor:
    """SAM on 2D slices: encode once (cached), then cheap prompt -> mask calls.

    Args:
        model: a SAM model (``napari_sam.build_sam``/``load_model`` or segment-anything's
            ``Sam``): ``image_encoder.img_size``, ``prompt_encoder``, ``mask_decoder``,
            ``preprocess``, ``mask_threshold``.
        contrast: how slices map to uint8 RGB (:class:`napari_sam.preprocess.Contrast`).
        cache_bytes: byte budget of the in-memory embedding LRU cache (0 disables it).
        model_key: a stable name for the model weights used in cache signatures (e.g.
            "vit_b:<sha256>"); default: the model object's identity and weight versions,
            valid for this process only.
        encoder_dtype: "float32", or "bfloat16" to run the image encoder under bfloat16
            autocast (faster on CPUs with AVX-512 BF16 / AMX and on GPUs; masks can differ
            slightly, see docs/performance.md).
        fast_decoder: use the re-associated decoder (same results up to float rounding).
        tta: test-time augmentation views per slice (:data:`TTA_VIEWS`: 1 none, 2 with the
            left-right flip, 4 with all flips). V views cost V encoder runs, V times the
            embedding memory and V decoder runs per prompt (docs/models.md).

    A predictor holds the current slice and scratch buffers: use one per thread (several
    predictors may share a model and an :class:`EmbeddingCache` via ``predictor.cache``).

    Attributes:
        encoder_runs: how many times the image encoder ran (cache misses).
        cache: the :class:`EmbeddingCache`.
        transform: :class:`ResizeLongestSide` to the encoder size, for ``predict_torch``.
    """

    def __init__(
        self,
        model: nn.Module,
        contrast: Contrast | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        *,
        model_key: str | None = None,
        encoder_dtype: Literal["float32", "bfloat16"] = "float32",
        fast_decoder: bool = True,
        tta: int = 1,
    ) -> None:
        for attr in ("image_encoder", "prompt_encoder", "mask_decoder", "preprocess"):
            if not hasattr(model, attr):
                raise TypeError(
                    f"model has no {attr!r}: SamPredictor needs a SAM model "
                    "(napari_sam.build_sam / load_model)"
                )
        if encoder_dtype not in ("float32", "bfloat16"):
            raise ValueError(
                f"encoder_dtype must be 'float32' or 'bfloat16', got {encoder_dtype!r}"
            )
        if contrast is None:
            contrast = Contrast()
        if not isinstance(contrast, Contrast):
            raise TypeError(f"contrast must be a napari_sam.preprocess.Contrast, got {contrast!r}")
        self._tta = _check_tta(tta)
        self.model = model.eval()
        self.contrast = contrast
        self.cache = EmbeddingCache(cache_bytes)
        self.model_key = model_key
        self.encoder_dtype = encoder_dtype
        self.fast_decoder = fast_decoder
        # models trained at native pixel scale (nsam) set input_min_side: small slices are
        # enlarged only up to that side and padded, not blown up to the input size
        self.transform = ResizeLongestSide(
            model.image_encoder.img_size, getattr(model, "input_min_side", None)
        )
        self.encoder_runs = 0
        self._embedding: Embedding | None = None
        self._prepared: list[_fast_decoder.Prepared] | None = None
        self._workspace = _fast_decoder.Workspace()

    # ----------------------------------------------------------------- image state
    @property
    def tta(self) -> int:
        """Test-time views per slice (:data:`TTA_VIEWS`). Setting another value forgets the
        current slice (cached embeddings stay, under their own setting)."""
        return self._tta

    @tta.setter
    def tta(self, value: int) -> None:
        value = _check_tta(value)
        if value != self._tta:
            self._tta = value
            self.reset_image()

    @property
    def device(self) -> torch.device:
        mean = getattr(self.model, "pixel_mean", None)
        if isinstance(mean, torch.Tensor):
            return mean.device
        return next(self.model.parameters()).device

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def original_size(self) -> tuple[int, int] | None:
        """(H, W) of the current slice, None before ``set_image``."""
        return None if self._embedding is None else self._embedding.original_size

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(h', w') of the current slice resized for the encoder, None before ``set_image``."""
        return None if self._embedding is None else self._embedding.input_size

    @property
    def features(self) -> torch.Tensor | None:
        """(1, C, h, w) current image embedding, None before ``set_image``."""
        return None if self._embedding is None else self._embedding.features

    def signature(self, image, key=None) -> str:
        """The cache key of ``image`` (as given to ``set_image``) under this predictor."""
        arr = check_slice(image)
        model_key = self.model_key or (
            f"{type(self.model).__name__}@{id(self.model):x}/{_weights_token(self.model)}"
        )
        return "|".join(
            (
                content_hash(arr),
                "-" if key is None else repr(key),
                model_key,
                self.contrast.key(),
                self.transform.key(),
                self.encoder_dtype,
                *(() if self.tta == 1 else (f"tta{self.tta}",)),
            )
        )

    @torch.inference_mode()
    def set_image(self, image, key=None) -> None:
        """Make ``image`` the current slice, encoding it unless its embedding is cached.

        Args:
            image: (H, W) grey or (H, W, 3) RGB, any real dtype (NaN/inf allowed); mapped to
                uint8 RGB with ``self.contrast`` (uint8 passes through under "auto").
            key: optional hashable naming the slice (e.g. its z index); part of the cache
                signature together with the content hash, the model and the contrast.
        """
        arr = check_slice(image)
        sig = self.signature(arr, key)
        emb = self.cache.get(sig)
        if emb is None:
            emb = self._encode(to_uint8_rgb(arr, self.contrast), sig)
            self.cache.put(emb)
        self._set(emb)

    def _encode(self, rgb: np.ndarray, signature: str) -> Embedding:
        x = resize_to_input(rgb, self.transform.target_length, self.transform.min_side)
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        views = []
        for flip_x, flip_y in TTA_VIEWS[self.tta]:
            dims = [d for d, f in ((-1, flip_x), (-2, flip_y)) if f]
            v = torch.flip(x, dims) if dims else x  # flipped before padding: a flipped slice
            v = self.model.preprocess(v.to(self.device, torch.float32))
            if self.encoder_dtype == "bfloat16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    views.append(self.model.image_encoder(v).float())
            else:
                views.append(self.model.image_encoder(v).float())
        self.encoder_runs += 1
        feats = torch.cat(views).contiguous()
        return Embedding(feats, (int(rgb.shape[0]), int(rgb.shape[1])), input_size, signature)

    def _set(self, emb: Embedding) -> None:
        self._embedding = emb
        self._prepared = None

    def get_embedding(self) -> Embedding:
        """The current slice's :class:`Embedding` (e.g. to store it on disk)."""
        self._require_image("get_embedding")
        return self._embedding

    @torch.inference_mode()
    def set_embedding(self, embedding: Embedding) -> None:
        """Make a stored embedding current (no encoder run); caches it if it has a signature.

        An embedding with more test-time views than this predictor uses serves it with its
        first ``tta`` views (the views of :data:`TTA_VIEWS` nest: view 0 is the slice).
        Raises ValueError when its shape does not fit this model or it has too few views.
        """
        if not isinstance(embedding, Embedding):
            raise TypeError(f"set_embedding needs an Embedding, got {type(embedding).__name__}")
        pe = self.model.prompt_encoder
        chans = getattr(self.model.image_encoder, "out_chans", pe.embed_dim)
        want = (int(chans), *map(int, pe.image_embedding_size))
        shape = tuple(embedding.features.shape)
        if len(shape) != 4 or shape[1:] != want:
            raise ValueError(
                f"embedding features have shape {shape}, this model needs "
                f"(views, {', '.join(map(str, want))}): was it computed with another model?"
            )
        if shape[0] not in TTA_VIEWS or shape[0] < self.tta:
            raise ValueError(
                f"the embedding has {shape[0]} test-time view(s), this predictor uses "
                f"{self.tta} (tta={self.tta}): compute it with tta >= {self.tta}"
            )
        h, w = embedding.original_size
        if self.transform.input_size((h, w)) != tuple(embedding.input_size):
            raise ValueError(
                f"embedding input_size {embedding.input_size} does not match original_size "
                f"{embedding.original_size} at encoder size {self.transform.target_length}"
            )
        feats = embedding.features.to(self.device, torch.float32)
        emb = Embedding(
            feats, (int(h), int(w)), tuple(map(int, embedding.input_size)), embedding.signature
        )
        self.cache.put(emb)
        if shape[0] > self.tta:  # more views than used: the first ones (TTA_VIEWS nest)
            emb = Embedding(feats[: self.tta], emb.original_size, emb.input_size, "")
        self._set(emb)

    def reset_image(self) -> None:
        """Forget the current slice (the cache keeps its embedding)."""
        self._embedding = None
        self._prepared = None

    def _require_image(self, what: str) -> None:
        if self._embedding is None:
            raise RuntimeError(
                f"No image is set: call predictor.set_image(image) (or set_embedding) before {what}()."
            )

    def _get_prepared(self, view: int = 0) -> _fast_decoder.Prepared:
        if self._prepared is None:
            pe = self.model.prompt_encoder
            image_pe = pe.get_dense_pe().to(self.device)
            _, no_mask = pe(points=None, boxes=None, masks=None)
            feats = self._embedding.features
            self._prepared = [
                _fast_decoder.prepare(feats[v : v + 1], image_pe, no_mask, self.model.mask_decoder)
                for v in range(feats.shape[0])
            ]
        return self._prepared[view]

    # ------------------------------------------------------------------ prediction
    @torch.inference_mode()
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        mask_size: tuple[int, int] | None = None,
        clicked_parts_only: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Masks for prompts on the current slice (numpy in, numpy out).

        Args:
            point_coords: (N, 2) float (x, y) pixels of the slice, or (B, N, 2) per box.
            point_labels: (N,) or (B, N): 1 foreground, 0 background.
            box: (4,) XYXY, or (B, 4) for a batch of boxes (batched outputs).
            mask_input: (1, 4h, 4w) low-res logits (``(1, 256, 256)`` for SAM), e.g.
                ``low_res_logits[[i]]`` of a previous call; (B, 1, 4h, 4w) with a box batch.
            multimask_output: 3 candidate masks (True) or 1 (False).
            return_logits: return float32 logits instead of bool masks.
            mask_size: (h, w) of the returned masks, default the slice size (H, W). Output
                pixel (i, j) samples the logits at the centre of the slice region it covers,
                slice pixel ``((i + 0.5) * H / h - 0.5, (j + 0.5) * W / w - 0.5)``: one
                interpolation from the low-res logits, so a small ``mask_size`` is cheap
                (e.g. a preview of a large slice; :meth:`masks_from_logits` gives the
                full-resolution mask later). ``mask_size = (H, W)`` is the default.
            clicked_parts_only: keep only the connected parts of each mask that a positive
                click touches (SAM often adds separate blobs on look-alike objects); a
                mask that no positive click touches stays whole, prompts without positive
                clicks are unaffected. The low-res logits returned are changed the same
                way (see :func:`napari_sam._masks.keep_clicked_parts`), so
                :meth:`masks_from_logits` and a refinement with them see the same mask.

        Returns:
            masks (C, H, W) bool (or float32 logits), iou_predictions (C,) float32,
            low_res_logits (C, 4h, 4w) float32; with a box batch (B, C, H, W), (B, C),
            (B, C, 4h, 4w). C = 3 (multimask) or 1; (H, W) is the slice size, or
            ``mask_size``.
        """
        self._require_image("predict")
        size = self.original_size
        out_size = _check_mask_size(mask_size, size)
        batched = False
        coords_t = labels_t = box_t = mask_t = None
        clicks = None
        if point_coords is not None:
            coords, labels = check_points(point_coords, point_labels, size)
            batched |= coords.ndim == 3
            if clicked_parts_only:
                c3 = coords if coords.ndim == 3 else coords[None]
                l2 = np.broadcast_to(labels, c3.shape[:2])
                clicks = [c[lab == 1] for c, lab in zip(c3, l2, strict=True)]
            coords = self.transform.apply_coords(coords, size)
            coords_t = torch.as_tensor(coords, dtype=torch.float32, device=self.device)
            labels_t = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
            if coords.ndim == 2:
                coords_t, labels_t = coords_t[None], labels_t[None]
        elif point_labels is not None:
            raise ValueError("point_labels given without point_coords")
        if box is not None:
            b = check_boxes(box, size)
            batched |= b.ndim == 2
            box_t = torch.as_tensor(
                self.transform.apply_boxes(b, size), dtype=torch.float32, device=self.device
            )
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            if m.ndim == 3:
                m = m[None]
            elif m.ndim == 4:
                batched = True
            else:
                raise ValueError(
                    f"mask_input must be (1, {self._mask_hw_str()}) low-res logits or batched "
                    f"(B, 1, {self._mask_hw_str()}), got shape {m.shape}"
                )
            mask_t = torch.as_tensor(m, device=self.device)
        if coords_t is None and box_t is None and mask_t is None:
            raise ValueError(
                "predict needs a prompt: point_coords + point_labels, box or mask_input"
            )
        masks, iou, low_res = self._predict(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits, out_size, clicks
        )
        masks, iou, low_res = masks.cpu().numpy(), iou.cpu().numpy(), low_res.cpu().numpy()
        if batched:
            return masks, iou, low_res
        if masks.shape[0] != 1:
            raise ValueError(f"unbatched prompts gave a batch of {masks.shape[0]}")  # guard
        return masks[0], iou[0], low_res[0]

    def _mask_hw_str(self) -> str:
        mh, mw = self.model.prompt_encoder.mask_input_size
        return f"{mh}, {mw}"

    @torch.inference_mode()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        mask_size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction with prompts already in the resized input frame.

        Args:
            point_coords: (B, N, 2) float (x, y) in the resized frame
                (``self.transform.apply_coords(xy, self.original_size)``), or None.
            point_labels: (B, N) int: 1 foreground, 0 background, -1 padding.
            boxes: (B, 4) XYXY in the resized frame (``transform.apply_boxes``), or None.
            mask_input: (B, 1, 4h, 4w) low-res logits, or None.
            A batch of 1 (points or mask_input) is shared by all B boxes.
            mask_size: (h, w) of the returned masks (see :meth:`predict`), default the
                slice size.

        Returns:
            masks (B, C, H, W) bool (or logits) at the slice size (or ``mask_size``),
            iou_predictions (B, C), low_res_logits (B, C, 4h, 4w).
        """
        self._require_image("predict_torch")
        out_size = _check_mask_size(mask_size, self.original_size)
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
                raise ValueError(
                    f"point_coords must be (B, N, 2), got {tuple(point_coords.shape)}"
                )
            if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
                raise ValueError(
                    f"point_labels {tuple(point_labels.shape)} must be (B, N) matching "
                    f"point_coords {tuple(point_coords.shape)}"
                )
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[-1] != 4):
            raise ValueError(f"boxes must be (B, 4) XYXY, got {tuple(boxes.shape)}")
        if mask_input is not None and mask_input.ndim != 4:
            raise ValueError(
                f"mask_input must be (B, 1, {self._mask_hw_str()}), got {tuple(mask_input.shape)}"
            )
        return self._predict(
            point_coords,
            point_labels,
            boxes,
            mask_input,
            multimask_output,
            return_logits,
            out_size,
        )

    @torch.inference_mode()
    def masks_from_logits(
        self,
        low_res_logits,
        size: tuple[int, int] | None = None,
        *,
        original_size: tuple[int, int] | None = None,
        return_logits: bool = False,
    ) -> np.ndarray:
        """Masks from low-res logits of an earlier :meth:`predict` call, e.g. one candidate.

        The same computation as in :meth:`predict`: ``masks_from_logits(low_res[i])``
        equals ``predict(...)[0][i]`` of the call that returned ``low_res`` (at any
        ``mask_size`` given as ``size``), bit for bit.

        Args:
            low_res_logits: (4h, 4w), (C, 4h, 4w) or (B, C, 4h, 4w) float logits (numpy or
                torch), ``(256, 256)`` per mask for SAM.
            size: (h, w) of the returned masks; default the slice size.
            original_size: (H, W) of the slice the logits belong to; default the current
                slice (``set_image``). Needs no embedding when given.
            return_logits: float32 logits instead of bool masks.

        Returns:
            masks of shape ``low_res_logits.shape[:-2] + size``, bool (or float32 logits).
        """
        if original_size is None:
            self._require_image("masks_from_logits")
            original_size = self.original_size
        original_size = _check_mask_size(original_size, None)
        out_size = _check_mask_size(size, original_size)
        low = torch.as_tensor(np.asarray(low_res_logits, dtype=np.float32))
        want = tuple(int(s) for s in self.model.prompt_encoder.mask_input_size)
        if low.ndim not in (2, 3, 4) or tuple(low.shape[-2:]) != want:
            raise ValueError(
                f"low_res_logits must be ({want[0]}, {want[1]}) low-res logits per mask, "
                f"optionally with leading (C,) or (B, C) axes; got shape {tuple(low.shape)}"
            )
        lead = tuple(low.shape[:-2])
        low = low.reshape(-1, *low.shape[-2:])[None].to(self.device)  # 1 x M x 4h x 4w
        geometry = (
            self.transform.input_size(original_size),
            out_size,
            self.transform.target_length,
        )
        if return_logits:
            masks = upsample_logits(low, *geometry)
        else:
            masks = upsample_binary(low, *geometry, getattr(self.model, "mask_threshold", 0.0))
        return masks.cpu().numpy().reshape(*lead, *out_size)

    def _predict(
        self, coords, labels, boxes, mask_input, multimask_output, return_logits, size, clicks=None
    ):
        pe = self.model.prompt_encoder
        dev = self.device
        sizes = {
            name: t.shape[0]
            for name, t in (("points", coords), ("boxes", boxes), ("mask_input", mask_input))
            if t is not None
        }
        batch = max(sizes.values(), default=1)
        if any(n not in (1, batch) for n in sizes.values()):
            raise ValueError(f"prompt batch sizes disagree: {sizes}")
        points = None
        if coords is not None:
            coords = coords.to(dev, torch.float32).expand(batch, -1, -1)
            labels = labels.to(dev).expand(batch, -1)
            points = (coords, labels)
        if boxes is not None:
            boxes = boxes.to(dev, torch.float32)
        if mask_input is not None:
            want = tuple(int(s) for s in pe.mask_input_size)
            if tuple(mask_input.shape[-3:]) != (1, *want):
                raise ValueError(
                    f"mask_input must be (1, {want[0]}, {want[1]}) low-res logits per prompt "
                    f"(e.g. low_res_logits[[i]] from a previous call), got "
                    f"{tuple(mask_input.shape)}"
                )
            mask_input = mask_input.to(dev, torch.float32).expand(batch, -1, -1, -1)
        views = TTA_VIEWS[self._embedding.features.shape[0]]
        if len(views) == 1:
            low_res, iou = self._decode_view(0, points, boxes, mask_input, batch, multimask_output)
        else:
            # each view decodes the prompts flipped like its image; its logits are flipped
            # back and averaged with the others' (as are the predicted IoUs)
            lows, ious = [], []
            for v, flip in enumerate(views):
                p, b, m = self._flip_prompts(flip, points, boxes, mask_input)
                low, iou = self._decode_view(v, p, b, m, batch, multimask_output)
                lows.append(self._flip_lowres(low, flip))
                ious.append(iou)
            low_res = torch.stack(lows).mean(0)
            iou = torch.stack(ious).mean(0)
        threshold = getattr(self.model, "mask_threshold", 0.0)
        if clicks is not None:
            if len(clicks) == 1 and low_res.shape[0] > 1:
                clicks = clicks * low_res.shape[0]
            low_res = keep_clicked_parts(
                low_res,
                clicks,
                self.input_size,
                self.original_size,
                self.transform.target_length,
                threshold,
            )
        # masks at ``size`` (the slice size unless a mask_size was asked for)
        geometry = (self.input_size, size, self.transform.target_length)
        if return_logits:
            masks = upsample_logits(low_res, *geometry)
        else:
            masks = upsample_binary(low_res, *geometry, getattr(self.model, "mask_threshold", 0.0))
        return masks, iou, low_res

    def _decode_view(self, view, points, boxes, mask_input, batch, multimask_output):
        """Low-res logits and predicted IoUs of one view's embedding (prompts in its frame)."""
        pe = self.model.prompt_encoder
        sparse, dense = pe(points=points, boxes=boxes, masks=mask_input)
        if sparse.shape[0] != batch:  # e.g. only a mask prompt
            sparse = sparse.expand(batch, -1, -1)
        return _fast_decoder.decode(
            self.model.mask_decoder,
            self._get_prepared(view),
            sparse,
            # prompt encoders that render points/boxes into the dense prompt (the project's
            # nsam models) need their dense output even without a mask prompt
            dense if mask_input is not None or getattr(pe, "renders_prompts", False) else None,
            multimask_output,
            fast=self.fast_decoder,
            ws=self._workspace,
        )

    def _flip_prompts(self, flip, points, boxes, mask_input):
        """Prompts (input frame) mirrored like the view ``flip = (left-right, up-down)``.

        Pixel x of the resized slice (width w') is pixel w' - 1 - x of the flipped one.
        """
        h, w = self.input_size
        if points is not None:
            coords, labels = points
            coords = coords.clone()
            for axis, (f, side) in enumerate(zip(flip, (w, h), strict=True)):
                if f:
                    coords[..., axis] = side - 1 - coords[..., axis]
            points = (coords, labels)
        if boxes is not None:
            boxes = boxes.clone()
            for axis, (f, side) in enumerate(zip(flip, (w, h), strict=True)):
                if f:
                    lo, hi = boxes[:, axis].clone(), boxes[:, axis + 2].clone()
                    boxes[:, axis], boxes[:, axis + 2] = side - 1 - hi, side - 1 - lo
        if mask_input is not None:
            mask_input = self._flip_lowres(mask_input, flip)
        return points, boxes, mask_input

    def _flip_lowres(self, logits: torch.Tensor, flip) -> torch.Tensor:
        """Low-res logits ``(..., 4h, 4w)`` mirrored like the view: only the part that covers
        the slice (the rest of the frame is padding)."""
        h, w = self.input_size
        cells = logits.shape[-1] / self.transform.target_length  # low-res cells per pixel
        if flip[0]:
            logits = _flip_axis(logits, logits.ndim - 1, w * cells)
        if flip[1]:
            logits = _flip_axis(logits, logits.ndim - 2, h * cells)
        return logits


def _check_tta(tta) -> int:
    if isinstance(tta, bool) or tta not in TTA_VIEWS:
        raise ValueError(f"tta must be one of {sorted(TTA_VIEWS)} (views per slice), got {tta!r}")
    return int(tta)


def _flip_axis(t: torch.Tensor, dim: int, extent: float) -> torch.Tensor:
    """Mirror the first ``extent`` cells of ``t`` along ``dim`` (cells beyond stay as they
    are). Cell j takes the value at ``extent - 1 - j``, linearly interpolated when
    ``extent`` is fractional (a slice side that is not a whole number of low-res cells)."""
    length = t.shape[dim]
    n = min(length, math.ceil(extent))
    src = (extent - 1 - torch.arange(n, dtype=torch.float32, device=t.device)).clamp(0, length - 1)
    i0 = src.floor().long()
    w = src - i0
    i1 = (i0 + 1).clamp(max=length - 1)
    shape = [1] * t.ndim
    shape[dim] = n
    w = w.view(shape).to(t.dtype)
    flipped = t.index_select(dim, i0) * (1 - w) + t.index_select(dim, i1) * w
    out = t.clone()
    out.narrow(dim, 0, n).copy_(flipped)
    return out


def _check_mask_size(mask_size, default) -> tuple[int, int]:
    """``(h, w)`` as two positive ints; ``default`` when None."""
    if mask_size is None:
        if default is None:
            raise ValueError("a mask size (h, w) is needed")
        return tuple(default)
    try:
        h, w = (int(v) for v in mask_size)
        ok = h == mask_size[0] and w == mask_size[1] and h >= 1 and w >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"mask size must be two positive integers (h, w), got {mask_size!r}")
    return h, w
