// Talks to the image API exactly as any other client does: the same endpoints, the same key in the
// Authorization header, the same error envelope. Nothing here knows about the page's elements.

export const ENDPOINTS = {
  generate: "/v1/images/generations",
  edit: "/v1/images/edits",
};

// The file extension of each output_format, as the server names its stored results.
export const EXTENSIONS = { png: "png", jpeg: "jpg", webp: "webp" };

// The stages the server reports in its server-timing header, in the order they happen.
export const STAGES = ["queue", "encode_prompt", "denoise", "previews", "decode", "encode_image"];

export class ApiError extends Error {
  constructor(status, error, { retryAfter = null, requestId = null } = {}) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
    this.type = error.type || null;
    this.retryAfter = retryAfter;
    this.requestId = requestId;
  }
}

// "queue;dur=1.2, denoise;dur=830.0" -> {queue: 1.2, denoise: 830}
export function parseServerTiming(header) {
  const timings = {};
  for (const entry of (header || "").split(",")) {
    const [name, ...params] = entry.trim().split(";");
    const duration = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    if (name && duration) timings[name.trim()] = Number(duration.slice(4));
  }
  return timings;
}

function retryAfterSeconds(response) {
  const value = response.headers.get("retry-after");
  if (value === null) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

// The sentence a person reads for a failed request: what kind of failure, the API's own message, and
// what to do next where there is something to do.
export function describeError(error) {
  if (!(error instanceof ApiError)) {
    return `Could not reach the server (${error.message || error}). Is it running?`;
  }
  const lead = {
    400: "The server refused the request",
    401: "The API key was not accepted",
    404: "Not found",
    413: "The request is too large",
    415: "The request's format was not accepted",
    429: "The server is busy",
    500: "The server had an error",
    503: "The server is not ready",
    504: "The request took too long",
  }[error.status] || (error.status ? `The request failed (HTTP ${error.status})` : "The request failed while it ran");
  let text = `${lead}: ${error.message}`;
  if (!/[.!?]$/.test(text)) text += ".";
  if (error.param && error.status === 400) text += ` (field: ${error.param})`;
  if (error.retryAfter !== null) {
    text += ` Try again in ${error.retryAfter} second${error.retryAfter === 1 ? "" : "s"}.`;
  }
  return text;
}

async function errorFrom(response) {
  let envelope = null;
  try {
    envelope = (await response.json()).error;
  } catch {
    // Not our JSON envelope (a proxy's page, say): fall back to the status line.
  }
  const error = envelope && typeof envelope === "object" ? envelope : { message: response.statusText || "no details" };
  return new ApiError(response.status, error, {
    retryAfter: retryAfterSeconds(response),
    requestId: response.headers.get("x-request-id"),
  });
}

export function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// The request body: JSON for generations; multipart for edits, with the images as file parts (image for
// one, image[] repeated for several, as the openai SDK sends them) and the mask as a file part.
export function requestBody(spec) {
  if (spec.mode === "generate") {
    return { body: JSON.stringify(spec.fields), headers: { "Content-Type": "application/json" } };
  }
  const form = new FormData();
  for (const [name, value] of Object.entries(spec.fields)) form.append(name, String(value));
  const part = spec.images.length > 1 ? "image[]" : "image";
  for (const image of spec.images) form.append(part, image.blob, image.name);
  if (spec.mask) form.append("mask", spec.mask.blob, spec.mask.name);
  return { body: form, headers: {} };
}

// Server-sent events from a streamed POST (EventSource can only GET): yields {event, data} per event.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    // A lone \r at the end may be the first half of \r\n: wait for the next chunk before normalising it.
    const complete = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const tail = buffer.slice(complete);
    buffer = buffer.slice(0, complete).replace(/\r\n?/g, "\n") + tail;
    let boundary;
    while ((boundary = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// One image request. Streams when spec.fields.stream is set and the server answers with events;
// `onPartial({index, partialIndex, b64, seed, format})` sees each preview as it arrives. Resolves to
// {images: [{b64, seed, index, format}], timings, usage, requestId}; rejects with ApiError.
export async function runImageRequest(spec, { key, signal, onPartial = () => {} }) {
  const { body, headers } = requestBody(spec);
  const response = await fetch(ENDPOINTS[spec.mode], {
    method: "POST",
    headers: { ...headers, ...authHeaders(key) },
    body,
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  const requestId = response.headers.get("x-request-id");
  const timings = parseServerTiming(response.headers.get("server-timing"));
  const format = spec.fields.output_format || "png";
  const type = response.headers.get("content-type") || "";
  if (!type.startsWith("text/event-stream")) {
    const payload = await response.json();
    const images = payload.data.map((item, index) => ({ b64: item.b64_json, seed: item.seed, index, format }));
    return { images, timings, usage: payload.usage || null, requestId };
  }
  const images = [];
  let usage = null;
  for await (const { event, data } of serverSentEvents(response)) {
    const kind = data.type || event;
    if (kind === "error" || event === "error") {
      // An error after the stream began (status 200 already sent) carries the usual envelope.
      throw new ApiError(0, data.error || { message: "the stream ended with an error" }, { requestId });
    }
    const index = data.image_index || 0;
    if (kind.endsWith(".partial_image")) {
      onPartial({ index, partialIndex: data.partial_image_index, b64: data.b64_json, seed: data.seed, format });
    } else if (kind.endsWith(".completed")) {
      images[index] = { b64: data.b64_json, seed: data.seed, index, format: data.output_format || format };
      if (data.usage) usage = data.usage;
      // A stream's headers leave before the work is done: its stage timings come with the completed event.
      if (data.timings) Object.assign(timings, data.timings);
    }
  }
  if (!images.length) throw new ApiError(0, { message: "the stream ended before any image arrived" }, { requestId });
  return { images: images.filter(Boolean), timings, usage, requestId };
}

export async function fetchJson(path, key) {
  const response = await fetch(path, { headers: authHeaders(key) });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}
