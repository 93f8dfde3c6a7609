// Server-Sent Events over fetch. EventSource can only GET; the answer route takes a POST body,
// so the stream is read from fetch's ReadableStream and parsed here (WHATWG SSE rules: lines end
// in CRLF, LF or CR; a blank line dispatches; "data" lines join with "\n"; ":" starts a comment).

/**
 * Yield `{event, data}` for each event of a streaming Response (data is the raw string).
 * @param {Response} response
 */
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // A CR at the very end may be the first half of a CRLF: wait for the next chunk.
      const complete = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const lines = buffer.slice(0, complete).split(/\r\n|\r|\n/);
      buffer = lines.pop() + buffer.slice(complete);
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield { event: event || "message", data: data.join("\n") };
          event = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        let val = colon === -1 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
      }
    }
    // An event cut off before its blank line is dropped, as the SSE rules say.
  } finally {
    reader.releaseLock();
  }
}
