// The source image of img2img / inpainting, and the mask painted over it with a brush.
//
// Two canvases at the image's own resolution hold the pixels: ``source`` (the image) and
// ``mask`` (opaque black, white where the brush went = repaint). The visible canvas shows the
// image with the mask tinted over it and is scaled by CSS (pixelated), so painting maps pointer
// positions to image pixels. Keyboard: arrow keys move the brush, Space paints, Shift+Space
// erases.

function canvas(width, height) {
  const c = document.createElement("canvas");
  c.width = width;
  c.height = height;
  return c;
}

function toBase64Png(c) {
  return new Promise((resolve, reject) => {
    c.toBlob((blob) => {
      if (!blob) {
        reject(new Error("the canvas could not be encoded as PNG"));
        return;
      }
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(blob);
    }, "image/png");
  });
}

export class MaskEditor {
  constructor({ view, brush, erase, summary, onChange }) {
    this.view = view;
    this.brush = brush;
    this.erase = erase;
    this.summary = summary;
    this.onChange = onChange;
    this.source = null;
    this.mask = null;
    this.cursor = { x: 0, y: 0 };
    this.painting = false;
    this.showCursor = false;
    view.addEventListener("pointerdown", (e) => this.pointerDown(e));
    view.addEventListener("pointermove", (e) => this.pointerMove(e));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) {
      view.addEventListener(name, () => this.pointerUp());
    }
    view.addEventListener("keydown", (e) => this.key(e));
    view.addEventListener("focus", () => {
      this.showCursor = true;
      this.draw();
    });
    view.addEventListener("blur", () => {
      this.showCursor = false;
      this.draw();
    });
  }

  get present() {
    return this.source !== null;
  }

  /** Take an image (ImageBitmap, <img>, canvas) as the new source, with an empty mask. */
  load(image) {
    const { width, height } = image;
    this.source = canvas(width, height);
    this.source.getContext("2d").drawImage(image, 0, 0);
    this.mask = canvas(width, height);
    this.view.width = width;
    this.view.height = height;
    this.brush.max = String(Math.max(1, Math.round(Math.max(width, height) / 2)));
    if (Number(this.brush.value) > Number(this.brush.max)) this.brush.value = this.brush.max;
    this.cursor = { x: Math.floor(width / 2), y: Math.floor(height / 2) };
    this.fill(false);
  }

  remove() {
    this.source = null;
    this.mask = null;
    this.onChange();
  }

  /** The whole mask white (true) or black (false). */
  fill(white) {
    const ctx = this.mask.getContext("2d");
    ctx.fillStyle = white ? "#fff" : "#000";
    ctx.fillRect(0, 0, this.mask.width, this.mask.height);
    this.changed();
  }

  /** The share of the mask painted (0..1). */
  coverage() {
    if (!this.mask) return 0;
    const { data } = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height);
    let white = 0;
    for (let i = 0; i < data.length; i += 4) if (data[i] >= 128) white += 1;
    return white / (data.length / 4);
  }

  changed() {
    const share = this.coverage();
    const { width, height } = this.source;
    this.summary.textContent =
      share === 0
        ? `Source ${width}×${height}; no mask painted: the whole image is reworked (img2img).`
        : `Source ${width}×${height}; ${Math.round(share * 100)}% masked: those parts are repainted (inpainting).`;
    this.draw();
    this.onChange();
  }

  draw() {
    if (!this.source) return;
    const ctx = this.view.getContext("2d");
    const { width, height } = this.source;
    ctx.globalAlpha = 1;
    ctx.globalCompositeOperation = "source-over";
    ctx.drawImage(this.source, 0, 0);
    // The mask, tinted: white parts show as translucent magenta over the image.
    const tint = canvas(width, height);
    const tctx = tint.getContext("2d");
    tctx.drawImage(this.mask, 0, 0);
    tctx.globalCompositeOperation = "multiply";
    tctx.fillStyle = "#ff00c8";
    tctx.fillRect(0, 0, width, height);
    tctx.globalCompositeOperation = "destination-in";
    const alpha = canvas(width, height);
    const actx = alpha.getContext("2d");
    const maskData = this.mask.getContext("2d").getImageData(0, 0, width, height);
    const alphaData = actx.createImageData(width, height);
    for (let i = 0; i < maskData.data.length; i += 4) alphaData.data[i + 3] = maskData.data[i];
    actx.putImageData(alphaData, 0, 0);
    tctx.drawImage(alpha, 0, 0);
    ctx.globalAlpha = 0.55;
    ctx.drawImage(tint, 0, 0);
    ctx.globalAlpha = 1;
    if (this.showCursor) {
      ctx.strokeStyle = "#00e5ff";
      ctx.lineWidth = Math.max(0.5, width / 128);
      ctx.beginPath();
      ctx.arc(this.cursor.x + 0.5, this.cursor.y + 0.5, this.radius(), 0, Math.PI * 2);
      ctx.stroke();
    }
  }

  radius() {
    return Math.max(0.5, Number(this.brush.value) / 2);
  }

  paintAt(x, y, erase) {
    const ctx = this.mask.getContext("2d");
    ctx.fillStyle = erase ? "#000" : "#fff";
    ctx.beginPath();
    ctx.arc(x + 0.5, y + 0.5, this.radius(), 0, Math.PI * 2);
    ctx.fill();
  }

  position(event) {
    const rect = this.view.getBoundingClientRect();
    return {
      x: Math.floor(((event.clientX - rect.left) / rect.width) * this.view.width),
      y: Math.floor(((event.clientY - rect.top) / rect.height) * this.view.height),
    };
  }

  pointerDown(event) {
    if (!this.source) return;
    event.preventDefault();
    this.view.setPointerCapture?.(event.pointerId);
    this.painting = true;
    this.pointerMove(event);
  }

  pointerMove(event) {
    if (!this.source) return;
    this.cursor = this.position(event);
    if (this.painting) {
      this.paintAt(this.cursor.x, this.cursor.y, this.erase.checked);
      this.draw();
    }
  }

  pointerUp() {
    if (this.painting) {
      this.painting = false;
      this.changed();
    }
  }

  key(event) {
    if (!this.source) return;
    const step = Math.max(1, Math.round(this.radius()));
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[event.key]) {
      const [dx, dy] = moves[event.key];
      this.cursor.x = Math.min(this.source.width - 1, Math.max(0, this.cursor.x + dx));
      this.cursor.y = Math.min(this.source.height - 1, Math.max(0, this.cursor.y + dy));
      event.preventDefault();
      this.draw();
    } else if (event.key === " " || event.key === "Enter") {
      event.preventDefault();
      this.paintAt(this.cursor.x, this.cursor.y, event.shiftKey || this.erase.checked);
      this.changed();
    }
  }

  /** {image, mask?} as base64 PNG for the request (no mask when nothing is painted). */
  async payload() {
    if (!this.source) return {};
    const body = { image: await toBase64Png(this.source) };
    if (this.coverage() > 0) body.mask = await toBase64Png(this.mask);
    return body;
  }
}
