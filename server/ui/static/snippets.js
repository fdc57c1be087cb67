// "Copy as curl" and "Copy as Python": the request a history entry made, written for a terminal and for
// the openai SDK, so the page teaches the API. The key is never written out: both read it from
// $STEPIMAGE_API_KEY. Input files are named as the page offers them for download.

import { ENDPOINTS, EXTENSIONS } from "./api.js";

// The openai SDK's own keyword arguments; every other field is this API's extension and goes in extra_body.
const SDK_ARGUMENTS = new Set([
  "model", "prompt", "n", "size", "response_format", "output_format", "output_compression", "stream",
  "partial_images",
]);

function shellQuote(text) {
  return `'${String(text).replace(/'/g, `'\\''`)}'`;
}

function pythonValue(name, value) {
  if (typeof value === "boolean") return value ? "True" : "False";
  // cfg_scale is a float on the wire; 1 and 1.0 are the same to the server, but 1.0 says what it is.
  if (typeof value === "number") return name === "cfg_scale" && Number.isInteger(value) ? `${value}.0` : String(value);
  // A JSON string literal is a valid Python string literal (the same escapes).
  return JSON.stringify(value);
}

export function curlCommand(spec, { origin, keysRequired }) {
  const lines = [`curl ${spec.fields.stream ? "-N " : ""}${origin}${ENDPOINTS[spec.mode]}`];
  if (keysRequired) lines.push(`-H "Authorization: Bearer $STEPIMAGE_API_KEY"`);
  if (spec.mode === "generate") {
    lines.push(`-H "Content-Type: application/json"`);
    lines.push(`--data-raw ${shellQuote(JSON.stringify(spec.fields))}`);
  } else {
    // --form-string sends text as it is: -F would read a value starting with @ or < as a file name.
    for (const [name, value] of Object.entries(spec.fields)) lines.push(`--form-string ${shellQuote(`${name}=${value}`)}`);
    const part = spec.images.length > 1 ? "image[]" : "image";
    for (const image of spec.images) lines.push(`-F ${shellQuote(`${part}=@${image.name}`)}`);
    if (spec.mask) lines.push(`-F ${shellQuote(`mask=@${spec.mask.name}`)}`);
  }
  return lines.join(" \\\n  ");
}

export function pythonCode(spec, { origin, keysRequired }) {
  const call = spec.mode === "generate" ? "client.images.generate" : "client.images.edit";
  const args = [];
  const extra = [];
  for (const [name, value] of Object.entries(spec.fields)) {
    if (SDK_ARGUMENTS.has(name)) args.push(`    ${name}=${pythonValue(name, value)},`);
    else extra.push(`${JSON.stringify(name)}: ${pythonValue(name, value)}`);
  }
  if (spec.mode === "edit") {
    const files = spec.images.map((image) => `open(${JSON.stringify(image.name)}, "rb")`);
    args.splice(2, 0, `    image=${files.length === 1 ? files[0] : `[${files.join(", ")}]`},`);
    if (spec.mask) args.splice(3, 0, `    mask=open(${JSON.stringify(spec.mask.name)}, "rb"),`);
  }
  if (extra.length) args.push(`    extra_body={${extra.join(", ")}},`);
  const key = keysRequired ? `os.environ["STEPIMAGE_API_KEY"]` : `os.environ.get("STEPIMAGE_API_KEY", "none")`;
  const extension = EXTENSIONS[spec.fields.output_format] || "png";
  const save = (item, indent) => [
    `${indent}seed = ${item}.model_extra["seed"]`,
    `${indent}with open(f"result-{seed}.${extension}", "wb") as out:`,
    `${indent}    out.write(base64.b64decode(${item}.b64_json))`,
    `${indent}print("saved", f"result-{seed}.${extension}")`,
  ];
  const lines = [
    "import base64",
    "import os",
    "",
    "from openai import OpenAI",
    "",
    ...(keysRequired ? [] : ["# This server asks for no key; the SDK needs some text all the same."]),
    `client = OpenAI(base_url=${JSON.stringify(origin + "/v1")}, api_key=${key})`,
  ];
  if (spec.fields.stream) {
    lines.push(`stream = ${call}(`, ...args, ")", "for event in stream:");
    lines.push(`    if event.type.endswith("partial_image"):`);
    lines.push(`        print("preview", event.partial_image_index, "of image", event.model_extra.get("image_index", 0))`);
    lines.push(`    elif event.type.endswith("completed"):`, ...save("event", "        "));
  } else {
    lines.push(`result = ${call}(`, ...args, ")", "for item in result.data:", ...save("item", "    "));
  }
  return lines.join("\n") + "\n";
}
