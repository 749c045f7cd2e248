"""The shapes data set of the demo model, and a judge that reads an image back.

Every image is one filled shape on a plain background. Its canonical caption is
``a {colour} {shape} on a {background} background`` with colour != background; training also
uses the forms people type (:func:`paraphrase`: ``an``, capitals, trailing punctuation, "orange
circle on green", "orange circle, green background", "on a green background, an orange circle",
and the background left out, when any background is right). Other code (training, evaluation,
the serving tests) measures against exactly this definition, so the palette and grammar here are
the reference; :func:`read_prompt` reads any of these forms back into what it asks for.

Rendering is supersampled (``_SUPERSAMPLE`` x) and box-filtered down, which gives
anti-aliased edges like a real photograph of a flat shape would have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
# Colours the demo model never saw, for fine-tunes (the tokenizer has their words, untrained).
NEW_COLOURS: dict[str, tuple[int, int, int]] = {"pink": (255, 105, 180)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
IMAGE_SIZE = 32
_SUPERSAMPLE = 4
_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")


@dataclass(frozen=True, slots=True)
class Scene:
    """What one image shows: the ground truth behind a caption."""

    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def parse_caption(caption: str) -> Scene:
    """Read a caption of the data set's grammar back into a :class:`Scene`."""
    match = _CAPTION.match(caption.strip().lower())
    if match is None:
        raise ValueError(f"not a caption of the shapes grammar: {caption!r}")
    colour, shape, background = match.groups()
    if colour not in PALETTE or background not in PALETTE or shape not in SHAPES:
        raise ValueError(f"unknown colour or shape in caption: {caption!r}")
    if colour == background:
        raise ValueError(f"colour and background are the same in caption: {caption!r}")
    return Scene(colour=colour, shape=shape, background=background)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt as a person might write it, and what it asks for: ``background`` is ``None``
    when the prompt leaves the background out (any background is then right)."""

    text: str
    colour: str
    shape: str
    background: str | None

    def matches(self, verdict: Judgement) -> tuple[bool, bool, bool]:
        """(background, colour, shape) agreement of a judged image with what the prompt asks."""
        return (
            self.background is None or verdict.background == self.background,
            verdict.colour == self.colour,
            verdict.shape == self.shape,
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# How people write a scene (``{a_colour}``: the grammatical article before the colour word).
FORMS_WITH_BACKGROUND: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",  # the exact template
    "{a_colour} {colour} {shape} on {a_background} {background} background",
    "{colour} {shape} on a {background} background",
    "{colour} {shape} on {background}",
    "{a_colour} {colour} {shape} on {background}",
    "{colour} {shape}, {background} background",
    "{a_colour} {colour} {shape}, {background} background",
    "on {a_background} {background} background, {a_colour} {colour} {shape}",
)
FORMS_WITHOUT_BACKGROUND: tuple[str, ...] = (
    "{a_colour} {colour} {shape}",
    "{colour} {shape}",
    "a {colour} {shape}",
)
PUNCTUATION: tuple[str, ...] = ("", "", ".", "!")


def paraphrase(scene: Scene, rng: np.random.Generator, *, background: bool = True) -> Prompt:
    """``scene`` in one of the forms people type, drawn with ``rng`` (not the exact template):
    a form, a capitalisation and a trailing punctuation mark. ``background=False`` leaves the
    background out."""
    forms = FORMS_WITH_BACKGROUND[1:] if background else FORMS_WITHOUT_BACKGROUND
    text = forms[int(rng.integers(len(forms)))].format(
        colour=scene.colour,
        shape=scene.shape,
        background=scene.background,
        a_colour=_article(scene.colour),
        a_background=_article(scene.background),
    )
    case = int(rng.integers(4))
    if case == 1:
        text = text[0].upper() + text[1:]
    elif case == 2:
        text = text.title()
    text += PUNCTUATION[int(rng.integers(len(PUNCTUATION)))]
    return Prompt(text, scene.colour, scene.shape, scene.background if background else None)


def canonical(scene: Scene) -> Prompt:
    return Prompt(scene.caption, scene.colour, scene.shape, scene.background)


_WORD = re.compile(r"[a-z]+")


def read_prompt(text: str, *, colours: tuple[str, ...] | None = None) -> Prompt:
    """What a prompt in any of the data set's forms asks for (colour words from ``colours``,
    default the palette): the colour word before ``background``, or after ``on`` (``on a``,
    ``on an``), is the background; the first other colour word is the object's. Raises
    ``ValueError`` when the prompt names no shape or no object colour."""
    known = colours or COLOURS
    words = _WORD.findall(text.lower())

    def is_background(i: int) -> bool:
        before = [w for w in words[max(i - 2, 0) : i] if w not in ("a", "an")]
        return words[i + 1 : i + 2] == ["background"] or before[-1:] == ["on"]

    positions = [i for i, w in enumerate(words) if w in known]
    background = next((words[i] for i in positions if is_background(i)), None)
    objects = [words[i] for i in positions if not is_background(i)]
    shape = next((w for w in words if w in SHAPES), None)
    if shape is None or not objects:
        raise ValueError(f"not a prompt of the shapes grammar: {text!r}")
    return Prompt(text, objects[0], shape, background)


def all_scenes() -> list[Scene]:
    """Every (colour, shape, background) combination of the grammar: 8 x 3 x 7 = 168."""
    return [
        Scene(colour=c, shape=s, background=b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c
    ]


def random_scenes(count: int, *, seed: int) -> list[Scene]:
    """``count`` scenes drawn uniformly from the grammar with a seeded generator."""
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    return [scenes[i] for i in rng.integers(0, len(scenes), size=count)]


def _shape_mask(shape: str, *, centre: tuple[float, float], size: float, grid: int) -> np.ndarray:
    """Boolean coverage of ``shape`` on a ``grid`` x ``grid`` supersampled canvas.

    ``size`` is the side of the shape's bounding box in canvas pixels; ``centre`` is (x, y).
    """
    ys, xs = np.mgrid[0:grid, 0:grid].astype(np.float32) + 0.5
    cx, cy = centre
    half = size / 2.0
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":
        # Upright: apex at the top centre, base along the bottom of the bounding box.
        top, bottom = cy - half, cy + half
        t = (ys - top) / size  # 0 at the apex, 1 at the base
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= t * half)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def render(
    scene: Scene,
    *,
    rng: np.random.Generator,
    image_size: int = IMAGE_SIZE,
    min_fraction: float = 0.35,
    max_fraction: float = 0.75,
    palette: dict[str, tuple[int, int, int]] | None = None,
) -> np.ndarray:
    """Draw ``scene`` as a ``uint8`` ``[H, W, 3]`` image; size and position come from ``rng``.

    The shape's bounding box is ``min_fraction``..``max_fraction`` of the image side and lies
    wholly inside the image.
    """
    grid = image_size * _SUPERSAMPLE
    size = rng.uniform(min_fraction, max_fraction) * grid
    margin = size / 2.0 + _SUPERSAMPLE  # keep a pixel of background around the shape
    cx = rng.uniform(margin, grid - margin)
    cy = rng.uniform(margin, grid - margin)
    coverage = _shape_mask(scene.shape, centre=(cx, cy), size=size, grid=grid).astype(np.float32)
    coverage = coverage.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE).mean(axis=(1, 3))
    colours = palette or PALETTE
    fg = np.asarray(colours[scene.colour], dtype=np.float32)
    bg = np.asarray(colours[scene.background], dtype=np.float32)
    image = bg + coverage[..., None] * (fg - bg)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def make_dataset(
    count: int,
    *,
    seed: int,
    image_size: int = IMAGE_SIZE,
    paraphrase_rate: float = 0.0,
    no_background_rate: float = 0.0,
) -> tuple[np.ndarray, list[str]]:
    """``count`` images (``uint8`` ``[N, H, W, 3]``) and their captions, fully seeded.

    A ``paraphrase_rate`` share of the captions is written in one of the forms people type
    (:func:`paraphrase`), of which a ``no_background_rate`` share leaves the background out; the
    rest is the exact template. The images and the scenes do not depend on the rates.
    """
    rng = np.random.default_rng(seed)
    words = np.random.default_rng([seed, 1])  # its own stream: the images stay the same
    scenes = all_scenes()
    picks = rng.integers(0, len(scenes), size=count)
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i, pick in enumerate(picks):
        scene = scenes[pick]
        images[i] = render(scene, rng=rng, image_size=image_size)
        if paraphrase_rate and words.random() < paraphrase_rate:
            captions.append(paraphrase(scene, words, background=words.random() >= no_background_rate).text)
        else:
            captions.append(scene.caption)
    return images, captions


def new_colour_scenes(colour: str) -> list[Scene]:
    """Every shape in ``colour`` (a :data:`NEW_COLOURS` word) on every palette background."""
    return [Scene(colour=colour, shape=s, background=b) for s in SHAPES for b in COLOURS]


def make_finetune_dataset(
    count: int,
    *,
    seed: int,
    colour: str = "pink",
    new_share: float = 0.5,
    paraphrase_rate: float = 0.5,
    image_size: int = IMAGE_SIZE,
) -> tuple[np.ndarray, list[str]]:
    """A fine-tune data set teaching a new colour: ``new_share`` of the images show ``colour``
    (every shape, the palette's backgrounds), the rest ordinary scenes of the grammar, so that
    the model does not forget them. Captions as in :func:`make_dataset`; fully seeded."""
    palette = {**PALETTE, colour: NEW_COLOURS[colour]}
    rng = np.random.default_rng([seed, 7])
    words = np.random.default_rng([seed, 8])
    new, old = new_colour_scenes(colour), all_scenes()
    images = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
    captions = []
    for i in range(count):
        pool = new if rng.random() < new_share else old
        scene = pool[int(rng.integers(len(pool)))]
        images[i] = render(scene, rng=rng, image_size=image_size, palette=palette)
        if words.random() < paraphrase_rate:
            captions.append(paraphrase(scene, words, background=words.random() >= 0.2).text)
        else:
            captions.append(scene.caption)
    return images, captions


# --------------------------------------------------------------------------- judging


def nearest_colour(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None) -> str:
    """Name of the palette colour nearest (Euclidean RGB) to ``rgb`` (default: :data:`PALETTE`)."""
    palette = palette or PALETTE
    names = list(palette)
    table = np.asarray([palette[n] for n in names], dtype=np.float32)
    distances = np.linalg.norm(table - np.asarray(rgb, dtype=np.float32)[None, :], axis=1)
    return names[int(np.argmin(distances))]


@dataclass(frozen=True, slots=True)
class Judgement:
    """What the judge reads off an image; ``shape`` is ``None`` when no object is found."""

    background: str
    colour: str | None
    shape: str | None


def judge(image: np.ndarray, *, palette: dict[str, tuple[int, int, int]] | None = None) -> Judgement:
    """Read background colour, object colour and shape off a ``uint8`` ``[H, W, 3]`` image.

    * background: the median colour of the one-pixel border, nearest palette colour;
    * object: pixels farther than a threshold from the background colour; the median of the
      clearly-inside ones gives the object's colour;
    * shape: the object's soft coverage map is compared with each ideal shape drawn (with the
      data set's own renderer) in the object's bounding box; the best intersection-over-union
      wins. Template matching is robust to the soft edges and rounded corners of decoded
      images, where simple fill-ratio thresholds mistake a soft square for a circle.
    """
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {pixels.shape}")
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb, palette)
    distance = np.linalg.norm(pixels - bg_rgb[None, None, :], axis=2)
    mask = distance > 60.0
    if mask.sum() < 4:
        return Judgement(background=background, colour=None, shape=None)
    strong = distance > 0.7 * distance[mask].max()
    colour = nearest_colour(np.median(pixels[strong], axis=0), palette)
    # Soft coverage: anti-aliased edges count for the share of the pixel they cover; the
    # background's own noise (measured on the border) counts for nothing.
    border_distance = np.linalg.norm(border - bg_rgb[None, :], axis=1)
    floor = float(np.percentile(border_distance, 95))
    full = max(float(np.percentile(distance[mask], 90)) - floor, 1.0)
    coverage = np.clip((distance - floor) / full, 0.0, 1.0)
    return Judgement(background=background, colour=colour, shape=_best_template(coverage))


def _best_template(coverage: np.ndarray) -> str | None:
    """The shape whose ideal rendering in the object's bounding box overlaps ``coverage`` best."""
    height, width = coverage.shape
    rows = np.flatnonzero(coverage.max(axis=1) > 0.5)
    cols = np.flatnonzero(coverage.max(axis=0) > 0.5)
    if len(rows) == 0 or len(cols) == 0:
        return None
    centre = ((cols[0] + cols[-1] + 1) / 2 * _SUPERSAMPLE, (rows[0] + rows[-1] + 1) / 2 * _SUPERSAMPLE)
    # Fractional extent: a column (row) counts for the most any of its pixels is covered.
    size = (float(coverage.max(axis=0).sum()) + float(coverage.max(axis=1).sum())) / 2 * _SUPERSAMPLE
    best, best_iou = None, -1.0
    for shape in SHAPES:
        ideal = _shape_mask(shape, centre=centre, size=size, grid=height * _SUPERSAMPLE).astype(np.float32)
        ideal = ideal.reshape(height, _SUPERSAMPLE, width, _SUPERSAMPLE).mean(axis=(1, 3))
        iou = float(np.minimum(ideal, coverage).sum()) / max(float(np.maximum(ideal, coverage).sum()), 1e-6)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


@dataclass(frozen=True, slots=True)
class Score:
    """Agreement between images and their prompts, each a fraction in [0, 1]."""

    background: float
    colour: float
    shape: float
    count: int

    def meets(self, *, background: float, colour: float, shape: float) -> bool:
        return self.background >= background and self.colour >= colour and self.shape >= shape


def score(
    images: np.ndarray,
    asked: list[Scene] | list[Prompt],
    *,
    palette: dict[str, tuple[int, int, int]] | None = None,
) -> Score:
    """Fraction of images whose background, object colour and shape match what was asked
    (a :class:`Scene`, or a :class:`Prompt`, whose background may be left out: any is right);
    colours are read against ``palette`` (default :data:`PALETTE`; add :data:`NEW_COLOURS` to
    judge a fine-tune's new colour)."""
    if len(images) != len(asked):
        raise ValueError(f"{len(images)} images but {len(asked)} prompts")
    prompts = [canonical(a) if isinstance(a, Scene) else a for a in asked]
    agreed = np.array(
        [p.matches(judge(img, palette=palette)) for img, p in zip(images, prompts, strict=True)], dtype=float
    )
    background, colour, shape = agreed.mean(axis=0)
    return Score(background=float(background), colour=float(colour), shape=float(shape), count=len(prompts))
