// The mask brush: the user paints over the first input image where it should change. The canvas has
// the image's own pixel size, so the mask needs no resampling. The exported mask follows OpenAI's
// semantics: a PNG of the image's size, fully transparent where painted (the area to change) and
// opaque elsewhere (kept).

export class MaskPainter {
  constructor(canvas, { onChange = () => {} } = {}) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d", { willReadFrequently: true });
    this.onChange = onChange;
    this.brush = 40;
    this.erase = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (event) => this.start(event));
    canvas.addEventListener("pointermove", (event) => this.move(event));
    for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, (event) => this.end(event));
  }

  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.context.clearRect(0, 0, width, height);
    this.onChange(0);
  }

  clear() {
    this.reset(this.canvas.width, this.canvas.height);
  }

  // Pointer position in image pixels; the brush size is in screen pixels so it feels the same at any zoom.
  point(event) {
    const rect = this.canvas.getBoundingClientRect();
    const scale = this.canvas.width / rect.width;
    return { x: (event.clientX - rect.left) * scale, y: (event.clientY - rect.top) * scale, scale };
  }

  start(event) {
    if (event.button !== 0) return;
    event.preventDefault();
    this.canvas.setPointerCapture(event.pointerId);
    this.last = this.point(event);
    this.stroke(this.last, this.last);
  }

  move(event) {
    if (!this.last) return;
    const next = this.point(event);
    this.stroke(this.last, next);
    this.last = next;
  }

  end(event) {
    if (!this.last) return;
    this.last = null;
    if (this.canvas.hasPointerCapture(event.pointerId)) this.canvas.releasePointerCapture(event.pointerId);
    this.onChange(this.paintedFraction());
  }

  stroke(from, to) {
    const context = this.context;
    context.globalCompositeOperation = this.erase ? "destination-out" : "source-over";
    context.strokeStyle = context.fillStyle = "#ff2d7a";
    context.lineWidth = this.brush * to.scale;
    context.lineCap = context.lineJoin = "round";
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  }

  // Share of the image painted, 0..1 (what the status line reports; 0 means no mask is sent).
  paintedFraction() {
    const { width, height } = this.canvas;
    if (!width || !height) return 0;
    const alpha = this.context.getImageData(0, 0, width, height).data;
    let painted = 0;
    for (let i = 3; i < alpha.length; i += 4) if (alpha[i] > 0) painted += 1;
    return painted / (width * height);
  }

  // The mask as a PNG Blob, or null when nothing is painted.
  async toBlob() {
    if (this.paintedFraction() === 0) return null;
    const { width, height } = this.canvas;
    const mask = document.createElement("canvas");
    mask.width = width;
    mask.height = height;
    const context = mask.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, width, height);
    // Cut the painted area out of the opaque layer: painted pixels become fully transparent.
    context.globalCompositeOperation = "destination-out";
    context.drawImage(this.canvas, 0, 0);
    return new Promise((resolve) => mask.toBlob(resolve, "image/png"));
  }
}
