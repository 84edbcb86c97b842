// An idempotent consumer of retm-relay's events (amqplib), small enough to copy.
//
// - Its own durable quorum queue, bound to the relay's topic exchange with the patterns it
//   wants, declared with the same arguments as `retm-relay declare` gives a consumer queue: a
//   message the consumer rejects is dead-lettered through the direct exchange
//   RETM_DEAD_LETTER_EXCHANGE to the quorum queue `<queue>.dead`.
// - Manual acknowledgements: a message is acknowledged only after its result is on disk.
// - Deduplication by message_id (the relay's dedup key): the journal of processed events, one
//   JSON line per event, is also the record of the ids already seen, so a copy is acknowledged
//   without being processed twice, across restarts too.
// - Poison messages (no message_id, a body that is not a JSON object, an order whose total is
//   not a decimal string, a customer without an integer id) are rejected without requeue.
//
// Settings (environment): RETM_AMQP_URL (amqp://guest:guest@127.0.0.1:5672/), RETM_EXCHANGE
// (retm.events), RETM_QUEUE (example.orders), RETM_BINDINGS (comma-separated, order.#),
// RETM_DEAD_LETTER_EXCHANGE (<RETM_EXCHANGE>.dlx), RETM_JOURNAL (processed.jsonl).
// Output: `ready QUEUE` once its queue is bound, then one line per message: `processed ID KEY`,
// `duplicate ID` or `dead-lettered ID: REASON`. SIGINT/SIGTERM stop it; a lost broker link ends
// it with exit code 1 (let systemd or your supervisor restart it: nothing unacknowledged is
// lost).
"use strict";

const fs = require("node:fs");
const amqp = require("amqplib");

const MONEY = /^-?[0-9]+\.[0-9]{3}$/;

class Poison extends Error {}

let stopping = false; // set by SIGINT/SIGTERM: what fails from then on is the shutdown itself

class Journal {
  constructor(path) {
    this.seen = new Set();
    if (fs.existsSync(path)) {
      for (const line of fs.readFileSync(path, "utf8").split("\n")) {
        try {
          this.seen.add(JSON.parse(line).message_id);
        } catch {
          // an empty or torn line: its message was never acknowledged
        }
      }
    }
    this.fd = fs.openSync(path, "a");
  }

  record(entry) {
    fs.writeSync(this.fd, JSON.stringify(entry) + "\n");
    fs.fsyncSync(this.fd);
    this.seen.add(entry.message_id);
  }
}

function check(routingKey, body) {
  if (body === null || typeof body !== "object" || Array.isArray(body)) {
    throw new Poison("not a JSON object");
  }
  const family = routingKey.split(".", 1)[0];
  if (family === "order") {
    const total = body.total_price;
    if (typeof total !== "string" || !MONEY.test(total)) {
      throw new Poison(`total_price is not a decimal string: ${JSON.stringify(total)}`);
    }
    return `invoice ${body.invoice_id} total ${total}`;
  }
  if (family === "customer") {
    const customer = body.customer;
    if (!customer || !Number.isInteger(customer.id)) throw new Poison("customer.id is not an integer");
    return `customer ${customer.id}`;
  }
  return `${Object.keys(body).length} fields`;
}

function handle(channel, message, journal) {
  const messageId = message.properties.messageId || "";
  const routingKey = message.fields.routingKey;
  let summary;
  try {
    if (!messageId) throw new Poison("no message_id");
    if (journal.seen.has(messageId)) {
      channel.ack(message);
      console.log(`duplicate ${messageId}`);
      return;
    }
    let body;
    try {
      body = JSON.parse(message.content.toString("utf8"));
    } catch {
      throw new Poison("not JSON");
    }
    summary = check(routingKey, body);
  } catch (err) {
    if (!(err instanceof Poison)) throw err;
    channel.reject(message, false);
    console.log(`dead-lettered ${messageId || "-"}: ${err.message}`);
    return;
  }
  journal.record({ message_id: messageId, routing_key: routingKey, summary });
  channel.ack(message);
  console.log(`processed ${messageId} ${routingKey}`);
}

async function main() {
  const env = process.env;
  const url = env.RETM_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/";
  const exchange = env.RETM_EXCHANGE || "retm.events";
  const queue = env.RETM_QUEUE || "example.orders";
  const bindings = (env.RETM_BINDINGS || "order.#").split(",").filter(Boolean);
  const dlx = env.RETM_DEAD_LETTER_EXCHANGE || `${exchange}.dlx`;
  const journal = new Journal(env.RETM_JOURNAL || "processed.jsonl");

  const connection = await amqp.connect(url);
  let consumerTag = null;
  let channel = null;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    if (channel !== null && consumerTag !== null) await channel.cancel(consumerTag);
    await connection.close();
  };
  // Before the first message can arrive: a stop request is never the default (abrupt) exit.
  const onSignal = () => stop().catch((err) => console.error(`while stopping: ${err.message}`));
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  connection.on("close", () => {
    if (!stopping) {
      console.error("broker link lost");
      process.exit(1);
    }
  });
  connection.on("error", (err) => console.error(`broker link error: ${err.message}`));
  channel = await connection.createChannel();
  await channel.prefetch(10);
  await channel.assertExchange(exchange, "topic", { durable: true });
  await channel.assertExchange(dlx, "direct", { durable: true });
  const dead = `${queue}.dead`;
  await channel.assertQueue(dead, { durable: true, arguments: { "x-queue-type": "quorum" } });
  await channel.bindQueue(dead, dlx, queue);
  await channel.assertQueue(queue, {
    durable: true,
    arguments: {
      "x-queue-type": "quorum",
      "x-dead-letter-exchange": dlx,
      "x-dead-letter-routing-key": queue,
    },
  });
  for (const pattern of bindings) await channel.bindQueue(queue, exchange, pattern);

  console.log(`ready ${queue}`); // declared and bound: from here on nothing is missed
  ({ consumerTag } = await channel.consume(queue, (message) => {
    if (message !== null) handle(channel, message, journal);
  }, { noAck: false }));
}

main().catch((err) => {
  if (stopping) return; // a stop during start-up: the closed connection fails the last call
  console.error(err.message);
  process.exit(1);
});
