// A model of the platform's old Node ensure-user route, for bench/run: Express 4 +
// node-redis v4 + jsonwebtoken, doing what that route did and nothing more.
//
//   POST /api/v1/auth/ensure-user   Authorization: Bearer <HS256 JWT>
//
// 1. express.json() (the app's global body parser) reads the body when there is one;
// 2. jwt.verify(token, JWT_SECRET) (401 without a token or with a bad one; 400 without
//    userId/email);
// 3. XADD stream:exness * function createUser userId <id> userEmail <email>
//    (three fields, in this order: the old wire format, on the one shared client);
// 4. OLD_ROUTE_MODE=enqueue: answers 200 right after the XADD;
//    OLD_ROUTE_MODE=full (the old code): client.duplicate() + connect() for this request,
//    XREAD BLOCK 5000 STREAMS stream:exnessReceive $ on it, 200 JSON when the XREAD returns
//    anything, 504 when it times out, then QUIT that connection.
//
// The XREAD reads from `$`: it returns the first reply added to stream:exnessReceive after
// the XREAD reached Redis, whoever's it is. So every request waiting at that moment wakes
// on any reply (all concurrent requests answer 200 on one reply), and a reply that came
// between this request's XADD and its XREAD is missed (the request waits for someone
// else's, or times out). That is exactly the old behaviour; the model keeps it.
//
// Environment: LISTEN_ADDR (127.0.0.1:3000), REDIS_URL (redis://127.0.0.1:6379),
// JWT_SECRET (required), OLD_ROUTE_MODE (enqueue | full; default full),
// OLD_ROUTE_BLOCK_MS (5000), OLD_ROUTE_ECHO=1 also runs the engine echo of
// engine_echo.js in this process (bench/run runs it as a process of its own instead).
"use strict";

const express = require("express");
const jwt = require("jsonwebtoken");
const { createClient } = require("redis");

const listen = process.env.LISTEN_ADDR || "127.0.0.1:3000";
const redisUrl = process.env.REDIS_URL || "redis://127.0.0.1:6379";
const secret = process.env.JWT_SECRET;
const mode = process.env.OLD_ROUTE_MODE || "full";
const blockMs = Number(process.env.OLD_ROUTE_BLOCK_MS || 5000);
const ENGINE_STREAM = "stream:exness";
const REPLY_STREAM = "stream:exnessReceive";

if (!secret) {
  console.error("JWT_SECRET is not set");
  process.exit(2);
}
if (mode !== "enqueue" && mode !== "full") {
  console.error(`OLD_ROUTE_MODE must be enqueue or full, not ${mode}`);
  process.exit(2);
}

const client = createClient({ url: redisUrl });
client.on("error", (err) => console.error("redis error", err.message));

const app = express();
app.use(express.json());

app.post("/api/v1/auth/ensure-user", async (req, res) => {
  const authHeader = req.headers.authorization;
  const token = authHeader && authHeader.split(" ")[1];
  if (!token) {
    return res.status(401).json({ error: "No token provided." });
  }
  let decoded;
  try {
    decoded = jwt.verify(token, secret);
  } catch (err) {
    return res.status(401).json({ error: "Invalid or expired token." });
  }
  const { userId, email } = decoded;
  if (!userId || !email) {
    return res.status(400).json({ error: "Invalid token payload." });
  }
  try {
    await client.xAdd(ENGINE_STREAM, "*", {
      function: "createUser",
      userId: String(userId),
      userEmail: String(email),
    });
    if (mode === "enqueue") {
      return res.status(200).json({ success: true, message: "User creation initiated", userId });
    }
    // The old code: a connection of its own per request, for the blocking read.
    const subscriber = client.duplicate();
    subscriber.on("error", (err) => console.error("redis error", err.message));
    await subscriber.connect();
    try {
      const reply = await subscriber.xRead(
        { key: REPLY_STREAM, id: "$" },
        { BLOCK: blockMs },
      );
      if (!reply) {
        return res.status(504).json({ error: "Engine did not respond in time" });
      }
      return res
        .status(200)
        .json({ success: true, message: "User ensured in Engine and DBStorage", userId });
    } finally {
      await subscriber.quit().catch(() => {});
    }
  } catch (err) {
    console.error("ensure-user failed", err.message);
    return res.status(500).json({ error: "Failed to ensure user" });
  }
});

async function main() {
  await client.connect();
  if (process.env.OLD_ROUTE_ECHO === "1") {
    require("./engine_echo.js").run(redisUrl);
  }
  const i = listen.lastIndexOf(":");
  const host = listen.slice(0, i);
  const port = Number(listen.slice(i + 1));
  const server = app.listen(port, host, () => {
    console.log(`old-route (${mode}) listening on ${host}:${port}`);
  });
  // Node's default keep-alive timeout (5 s) is the old server's; wrk keeps its
  // connections busy, so it never applies during a run.
  const stop = () => {
    server.close();
    client.quit().finally(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error("old-route failed to start", err);
  process.exit(1);
});
