// The "engine echo" for the old route's full form in bench/run: the Engine never answers in
// the benchmark, so this stands in for it, as quickly as an Engine could. It reads
// stream:exness (XREAD BLOCK, up to 1000 entries at a time, from the last id it saw, so no
// command is missed) and adds one reply per command to stream:exnessReceive, in the older
// Engine's reply format: one field `message` = {"function":"createUser","message":"<userId>"}
// (no ids: the old route could not tell replies apart anyway). The replies of one read
// are sent together (node-redis pipelines the commands of one tick).
//
//   REDIS_URL=redis://127.0.0.1:PORT node engine_echo.js
//
// An echo that reads from `$` one entry at a time, as the older Engine did, would drop
// commands published while it was busy; this one answers every command, which is the most
// favourable Engine the old route could have had.
"use strict";

const { createClient } = require("redis");

const ENGINE_STREAM = "stream:exness";
const REPLY_STREAM = "stream:exnessReceive";

async function run(redisUrl) {
  const reader = createClient({ url: redisUrl });
  const writer = createClient({ url: redisUrl });
  reader.on("error", (err) => console.error("echo redis error", err.message));
  writer.on("error", (err) => console.error("echo redis error", err.message));
  await reader.connect();
  await writer.connect();
  console.log(`engine echo: ${ENGINE_STREAM} -> ${REPLY_STREAM}`);
  let last = "$";
  for (;;) {
    const streams = await reader.xRead(
      { key: ENGINE_STREAM, id: last },
      { BLOCK: 1000, COUNT: 1000 },
    );
    if (!streams) continue;
    const writes = [];
    for (const { messages } of streams) {
      for (const { id, message } of messages) {
        last = id;
        const reply = JSON.stringify({ function: "createUser", message: message.userId });
        writes.push(writer.xAdd(REPLY_STREAM, "*", { message: reply }));
      }
    }
    await Promise.all(writes);
  }
}

module.exports = { run };

if (require.main === module) {
  const stop = () => process.exit(0);
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
  run(process.env.REDIS_URL || "redis://127.0.0.1:6379").catch((err) => {
    console.error("engine echo failed", err);
    process.exit(1);
  });
}
