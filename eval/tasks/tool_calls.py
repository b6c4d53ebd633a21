"""A second structured task, in the chat ``messages`` format: pick a function from the ones a system
message lists and fill its arguments from the user's request, replying with one JSON call.

It exists to check that training and the eval work on data the project was not tuned on (a function-
calling dataset as users bring them: system / user / assistant turns). Made with
``medusa-lora make-tool-call-data --out-dir data/tool-calls``; score with ``--scorer exact``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .data_files import load_data
from .splits import GeneratedSplits, Records

FORMAT_VERSION = 1
_DATA = load_data("tool_calls.yaml")  # what the requests are drawn from
CITIES: list[str] = _DATA["cities"]
PEOPLE: list[str] = _DATA["people"]
DAYS: list[str] = _DATA["days"]
TIMES: list[str] = _DATA["times"]
CURRENCIES: list[str] = _DATA["currencies"]
TOPICS: list[str] = _DATA["topics"]
SONGS: list[tuple[str, str]] = [(song["title"], song["artist"]) for song in _DATA["songs"]]
LANGUAGES: list[str] = _DATA["languages"]
PHRASES: list[str] = _DATA["phrases"]


def _call(rng: random.Random) -> tuple[str, dict[str, Any], list[str]]:
    """One request: the function, its arguments, and ways a user might ask for it."""
    kind = rng.randrange(10)
    if kind == 0:
        city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
        args = {"city": city, "unit": unit}
        asks = [
            f"What's the weather in {city} right now? Use {unit}.",
            f"Current weather for {city} in {unit}, please.",
        ]
        return "get_weather", args, asks
    if kind == 1:
        a, b = rng.sample(CITIES, 2)
        day, seats = rng.choice(DAYS), rng.randint(1, 4)
        args = {"origin": a, "destination": b, "date": day, "passengers": seats}
        asks = [
            f"Find flights from {a} to {b} on {day} for {seats} passenger(s).",
            f"I need {seats} seat(s) flying {a} to {b}, leaving {day}.",
        ]
        return "search_flights", args, asks
    if kind == 2:
        who, topic, day, at = rng.choice(PEOPLE), rng.choice(TOPICS), rng.choice(DAYS), rng.choice(TIMES)
        minutes = rng.choice([15, 30, 45, 60, 90])
        args = {"title": topic, "attendee": who, "date": day, "start": at, "duration_minutes": minutes}
        asks = [
            f"Book a {minutes}-minute meeting about the {topic} with {who} on {day} at {at}.",
            f"Schedule '{topic}' with {who}, {day} {at}, {minutes} minutes.",
        ]
        return "create_event", args, asks
    if kind == 3:
        who, topic = rng.choice(PEOPLE), rng.choice(TOPICS)
        args = {
            "to": who,
            "subject": topic.capitalize(),
            "body": f"Hi {who.split()[0]}, can we discuss the {topic}?",
        }
        asks = [
            f"Email {who} with subject '{topic.capitalize()}' asking if we can discuss the {topic}.",
            f"Send {who} a note titled '{topic.capitalize()}' about discussing the {topic}.",
        ]
        return "send_email", args, asks
    if kind == 4:
        amount, (src, dst) = round(rng.uniform(5, 5000), 2), rng.sample(CURRENCIES, 2)
        args = {"amount": amount, "from_currency": src, "to_currency": dst}
        asks = [f"Convert {amount} {src} to {dst}.", f"How much is {amount} {src} in {dst}?"]
        return "convert_currency", args, asks
    if kind == 5:
        title, artist = rng.choice(SONGS)
        volume = rng.choice([20, 35, 50, 65, 80])
        args = {"track": title, "artist": artist, "volume": volume}
        asks = [
            f"Play {title} by {artist} at volume {volume}.",
            f"Put on '{title}' ({artist}), volume {volume}.",
        ]
        return "play_music", args, asks
    if kind == 6:
        text, lang = rng.choice(PHRASES), rng.choice(LANGUAGES)
        args = {"text": text, "target_language": lang}
        asks = [f"Translate '{text}' into {lang}.", f"How do you say '{text}' in {lang}?"]
        return "translate", args, asks
    if kind == 7:
        day, at, topic = rng.choice(DAYS), rng.choice(TIMES), rng.choice(TOPICS)
        args = {"message": f"Prepare the {topic}", "date": day, "time": at}
        asks = [
            f"Remind me to prepare the {topic} on {day} at {at}.",
            f"Set a reminder: prepare the {topic}, {day} {at}.",
        ]
        return "set_reminder", args, asks
    if kind == 8:
        order = f"{rng.choice('ABCDEFGH')}{rng.randint(10000, 99999)}"
        args = {"order_id": order, "include_items": rng.random() < 0.5}
        detail = " with the item list" if args["include_items"] else ""
        asks = [f"What's the status of order {order}{detail}?", f"Check order {order}{detail}."]
        return "get_order_status", args, asks
    room, temp = rng.choice(["kitchen", "bedroom", "office", "living room"]), rng.randint(16, 26)
    args = {"room": room, "temperature_celsius": temp, "mode": rng.choice(["heat", "cool", "auto"])}
    asks = [
        f"Set the {room} thermostat to {temp} degrees Celsius in {args['mode']} mode.",
        f"{room.capitalize()}: {temp}C, mode {args['mode']}.",
    ]
    return "set_thermostat", args, asks


def _spec(name: str, args: dict[str, Any]) -> dict[str, Any]:
    types = {bool: "boolean", int: "integer", float: "number", str: "string"}
    return {"name": name, "parameters": {key: types[type(value)] for key, value in args.items()}}


def make_example(rng: random.Random) -> dict[str, Any]:
    """One messages record: system (the functions), user (the request), assistant (the JSON call)."""
    name, args, asks = _call(rng)
    specs = {name: _spec(name, args)}
    while len(specs) < rng.randint(3, 5):
        other, other_args, _ = _call(rng)
        specs.setdefault(other, _spec(other, other_args))
    listed = list(specs.values())
    rng.shuffle(listed)
    system = (
        "You can call the functions below. Reply with exactly one JSON object "
        '{"name": ..., "arguments": {...}} and nothing else.\n\nFunctions:\n'
        + "\n".join(json.dumps(s, separators=(",", ":")) for s in listed)
    )
    call = json.dumps({"name": name, "arguments": args}, separators=(",", ":"))
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": rng.choice(asks)},
            {"role": "assistant", "content": call},
        ]
    }


def make_splits(seed: int, n_train: int, n_validation: int, n_test: int) -> Records:
    """Distinct requests in each split (no user turn is in two splits)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: Records = {}
    for split, n in (("train", n_train), ("validation", n_validation), ("test", n_test)):
        records = []
        while len(records) < n:
            record = make_example(rng)
            key = record["messages"][1]["content"]
            if key not in seen:
                seen.add(key)
                records.append({**record, "id": f"{split}-{len(records):05d}"})
        out[split] = records
    return out


TOOL_CALL_DATA = GeneratedSplits(
    make_splits,
    {"task": "tool-calls", "format_version": FORMAT_VERSION},
    (2000, 200, 200),
    "medusa-lora make-tool-call-data",
    "generate the function-calling task (messages format)",
    Path("data/tool-calls"),
)
write_tool_call_data = TOOL_CALL_DATA.write  # messages-format splits, reused if made with the same parameters
main = TOOL_CALL_DATA.main


if __name__ == "__main__":
    raise SystemExit(main())
