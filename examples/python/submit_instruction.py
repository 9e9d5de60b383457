#!/usr/bin/env python3
"""Submit one pgfanout instruction from Python, and optionally wait for its result, or
for its confirmation on the whole fleet.

Wire format (the same as `pgfanout submit`):
  * topic `<prefix>instructions`; record value = a plain Avro binary datum of
    schemas/instruction.avsc (no Confluent schema-registry framing, no container header);
    record key = issued_by (UTF-8), so one issuer's instructions keep their order.
  * The executor answers on `<prefix>results` with a plain Avro datum of
    schemas/result.avsc, keyed by instruction_id; status is committed, rejected or failed.
  * With `pgfanout confirm` running, `<prefix>confirmations` carries plain Avro datums of
    schemas/confirmation.avsc keyed by instruction_id: `pending` (devices still missing
    after the deadline) and exactly one final `applied` once every registered device has
    applied the instruction (`--wait fleet`), or those its `target` names (`--target
    site=berlin`, `--at-least 2`).
  * instruction_id (a UUID) is the idempotency key: sending the same instruction again
    never applies it twice, and yields the same result.
  * Field values are a union [null, boolean, long, double, string, bytes]; PostgreSQL
    casts each to its column's type, so numeric, date or json values travel as strings.

Example:
  python3 submit_instruction.py --op upsert --table public.items --key id=7 \\
      --value name='"widget"' --value qty=3 --wait
Values are JSON when they parse (3 is a long, 1.5 a double, "x" a string, null,
{"$hex": "00ff"} bytes, other arrays and objects JSON text), else plain strings.
Several --op groups make one instruction, applied atomically.
Exit status: 0 submitted (and committed with --wait, and applied on the fleet with
--wait fleet), 1 rejected or failed, 2 no result or confirmation within --timeout, 3 bad
input or a Kafka error.
"""
import argparse, io, json, os, re, sys, time, uuid
from datetime import datetime, timedelta, timezone

import fastavro
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

SCHEMAS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "schemas")
INSTRUCTION = fastavro.schema.load_schema(os.path.join(SCHEMAS, "instruction.avsc"))
RESULT = fastavro.schema.load_schema(os.path.join(SCHEMAS, "result.avsc"))
CONFIRMATION = fastavro.schema.load_schema(os.path.join(SCHEMAS, "confirmation.avsc"))
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
CONSUMER_ONLY = ("fetch.", "session.", "heartbeat.", "group.", "auto.offset", "max.poll")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(3)


def no_constant(name):  # NaN and Infinity are not JSON: they stay strings
    raise ValueError(name)


def avro_value(text):
    """A command-line value for the Field.value union. fastavro's (branch, value) tuples name
    the branch: a Python int is always written as long, a float as double."""
    try:
        v = json.loads(text, parse_constant=no_constant)
    except ValueError:
        return ("string", text)
    if v is None:
        return None
    if isinstance(v, bool):  # before int: bool is a subclass of int
        return ("boolean", v)
    if isinstance(v, int):
        return ("long", v) if -2**63 <= v < 2**63 else ("double", float(v))
    if isinstance(v, float):
        return ("double", v)
    if isinstance(v, str):
        return ("string", v)
    if isinstance(v, dict) and len(v) == 1 and isinstance(v.get("$hex"), str):
        if not re.fullmatch(r"([0-9a-fA-F]{2})*", v["$hex"]):
            fail(f"{text}: $hex must be an even number of hex digits")
        return ("bytes", bytes.fromhex(v["$hex"]))
    return ("string", json.dumps(v, separators=(",", ":")))  # for json/jsonb columns


class OpAction(argparse.Action):
    """--op starts an operation; --table, --key and --value fill in the latest one."""
    def __call__(self, parser, ns, value, option):
        if self.dest == "op":
            ns.ops.append({"op": value, "table": None, "key": [], "values": []})
            return
        if not ns.ops:
            parser.error(f"{option} must follow an --op")
        if self.dest == "table":
            ns.ops[-1]["table"] = value
            return
        name, sep, raw = value.partition("=")
        if not sep:
            parser.error(f"{value!r} is not name=value")
        ns.ops[-1][self.dest].append({"name": name, "value": avro_value(raw)})


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: (p.print_usage(sys.stderr), fail(message))
    env = os.environ.get
    p.add_argument("--brokers", default=env("PGFANOUT_BROKERS", "127.0.0.1:9092"))
    p.add_argument("--topic-prefix", default=env("PGFANOUT_TOPIC_PREFIX", "pgfanout."))
    p.add_argument("--kafka-properties", default=env("PGFANOUT_KAFKA_PROPERTIES", ""),
                   help="librdkafka key=value pairs, comma separated")
    p.add_argument("--issued-by", default=env("PGFANOUT_DEVICE_ID", "python-example"))
    p.add_argument("--wait", nargs="?", const="committed", choices=["committed", "fleet"],
                   help="wait for the result and print it (committed, the default), and with fleet "
                        "also for the final confirmation that every registered device applied it")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    p.add_argument("--target", action="append", default=[], metavar="LABEL=VALUE",
                   help="confirm on the devices with this label only (repeatable: all of them)")
    p.add_argument("--at-least", type=int, help="confirm once this many of the targeted devices applied it")
    p.add_argument("--op", action=OpAction, choices=["insert", "update", "upsert", "delete"])
    p.add_argument("--table", action=OpAction, help="schema.table")
    p.add_argument("--key", action=OpAction, dest="key", metavar="NAME=VALUE")
    p.add_argument("--value", action=OpAction, dest="values", metavar="NAME=VALUE")
    p.set_defaults(ops=[])
    args = p.parse_args()
    if not args.ops or any(op["table"] is None for op in args.ops):
        p.error("give at least one --op, each with a --table")
    return args


def at_end(consumer, name):
    """Every partition of topic `name`, at its end now."""
    topic = consumer.list_topics(name, timeout=10).topics[name]
    if topic.error is not None or not topic.partitions:
        fail(f"topic {name} does not exist")
    return [TopicPartition(name, p, consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1])
            for p in topic.partitions]


def main():
    args = parse_args()
    conf = {"bootstrap.servers": args.brokers}
    conf.update(kv.split("=", 1) for kv in args.kafka_properties.split(",") if "=" in kv)
    instruction = {
        "instruction_id": str(uuid.uuid4()),
        "issued_by": args.issued_by,
        "issued_at": time.time_ns() // 1000,  # timestamp-micros
        "operations": args.ops,
        "target": None,
    }
    if args.target or args.at_least is not None:
        if any("=" not in t for t in args.target):
            fail("--target takes LABEL=VALUE")
        labels = dict(t.split("=", 1) for t in args.target)
        instruction["target"] = {"labels": labels, "at_least": args.at_least}
    if args.wait:  # positioned BEFORE producing, so the result cannot be missed
        consumer = Consumer({**conf, "group.id": f"pgfanout-example-{uuid.uuid4()}",
                             "enable.auto.commit": False, "enable.auto.offset.store": False})
        followed = ["results"] + (["confirmations"] if args.wait == "fleet" else [])
        consumer.assign([tp for name in followed for tp in at_end(consumer, args.topic_prefix + name)])

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, INSTRUCTION, instruction)
    # Consumer settings in --kafka-properties would only draw warnings from the producer.
    producer_conf = {k: v for k, v in conf.items() if not k.startswith(CONSUMER_ONLY)}
    producer = Producer({**producer_conf, "enable.idempotence": True, "acks": "all"})
    delivery = []
    producer.produce(args.topic_prefix + "instructions", key=args.issued_by.encode(), value=buf.getvalue(),
                     on_delivery=lambda err, msg: delivery.append(err))
    if producer.flush(30) > 0 or delivery != [None]:
        fail(f"not delivered: {delivery[0] if delivery else 'timed out'}")
    print(f"submitted {instruction['instruction_id']}", flush=True)
    if not args.wait:
        return 0

    deadline = time.monotonic() + args.timeout
    committed = False
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            is_result = msg.topic() == args.topic_prefix + "results"
            try:
                record = fastavro.schemaless_reader(io.BytesIO(msg.value()), RESULT if is_result else CONFIRMATION)
            except Exception:  # not a record of that schema: not ours either
                continue
            if record["instruction_id"] != instruction["instruction_id"]:
                continue
            # fastavro reads timestamp-micros as a datetime: back to microseconds
            for field in ("executed_at", "committed_at", "confirmed_at", "last_applied_at"):
                if isinstance(record.get(field), datetime):
                    record[field] = (record[field] - EPOCH) // timedelta(microseconds=1)
            for missing in record.get("missing", []):
                if isinstance(missing.get("last_seen"), datetime):
                    missing["last_seen"] = (missing["last_seen"] - EPOCH) // timedelta(microseconds=1)
            print(json.dumps(record), flush=True)
            if is_result and record["status"] != "committed":
                return 1
            committed |= is_result
            if (is_result and args.wait == "committed") or (not is_result and record["status"] == "applied"):
                return 0
    finally:
        consumer.close()
    waited = "confirmation on the fleet" if committed else "result"
    print(f"error: no {waited} for {instruction['instruction_id']} within {args.timeout} s", file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KafkaException as e:
        fail(f"kafka: {e}")
