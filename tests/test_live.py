"""live-gateway: the Binance adapter on the frames of Binance's own documentation (pure), then the
gateway against a local WebSocket server speaking that format (disconnects mid-stream, malformed
frames, a silent feed) on a real nats-server, through the normalizer to bars and the sink to Delta.

Frames: the trade and book-ticker payload examples of github.com/binance/binance-spot-api-docs,
web-socket-streams.md, as documented, with our symbols and ids where a scenario needs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable
from prometheus_client import REGISTRY
from websockets.asyncio.server import ServerConnection, serve

from tradingstack.api import ServiceName
from tradingstack.lake import MARKET_TICKS
from tradingstack_services.marketdata import live, normalizer, sink
from tradingstack_services.marketdata.live import BinanceSpot, ConnectLimiter, LiveGateway
from tradingstack_services.marketdata.ticks import InvalidMessageError, Tick
from tradingstack_services.platform.settings import ServiceSettings

from conftest import LiveServer, free_port, wait_for
from test_trading_e2e import Platform, running_platform

DOC_TRADE = {"e": "trade", "E": 1672515782136, "s": "BNBBTC", "t": 12345, "p": "0.001", "q": "100", "b": 88,
             "a": 50, "T": 1672515782136, "m": True, "M": True}  # fmt: skip
DOC_BOOK = {"u": 400900217, "s": "BNBUSDT", "b": "25.35190000", "B": "31.21000000", "a": "25.36520000",
            "A": "40.66000000"}  # fmt: skip
RECEIVED = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def combined(stream: str, data: Any) -> str:
    return json.dumps({"stream": stream, "data": data})


def test_the_docs_trade_becomes_a_tick_with_the_venues_ids_and_times() -> None:
    frame = BinanceSpot().parse(combined("bnbbtc@trade", DOC_TRADE), RECEIVED)
    (tick,) = frame.ticks
    assert frame.symbol == "BNBBTC"
    assert (tick.price, tick.size, tick.trade_id, tick.source_seq) == (0.001, 100.0, "12345", 12345)
    assert tick.side == "sell"  # "m": the buyer was the maker, so the seller took
    assert tick.event_ts == datetime(2022, 12, 31, 19, 43, 2, 136000, tzinfo=UTC)  # 1672515782136 ms
    assert (tick.receive_ts, tick.exchange, tick.tick_id) == (RECEIVED, "binance", "binance:BNBBTC:12345")


def test_a_book_ticker_sets_the_touch_the_next_trades_carry() -> None:
    adapter = BinanceSpot()
    book = adapter.parse(json.dumps(DOC_BOOK), RECEIVED)  # a raw (not combined) stream's frame
    assert (book.symbol, book.ticks) == ("BNBUSDT", [])
    (tick,) = adapter.parse(combined("bnbusdt@trade", {**DOC_TRADE, "s": "BNBUSDT", "m": False}), RECEIVED).ticks
    assert (tick.bid, tick.ask, tick.side) == (25.3519, 25.3652, "buy")


@pytest.mark.parametrize(
    "frame",
    [json.dumps({"result": None, "id": 1}), json.dumps({"e": "serverShutdown", "E": 1}),
     combined("x", {"e": "serverShutdown", "E": 1})],
    ids=["subscribe-answer", "shutdown", "combined-shutdown"],
)  # fmt: skip
def test_control_frames_carry_no_ticks(frame: str) -> None:
    assert BinanceSpot().parse(frame, RECEIVED).ticks == []


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "malformed_frame"), (b"\xff\xfe", "malformed_frame"), ("[1, 2]", "malformed_frame"),
        (combined("s", [1]), "malformed_frame"), (combined("s", {**DOC_TRADE, "s": ""}), "invalid_field"),
        (combined("s", {**DOC_TRADE, "p": "abc"}), "invalid_field"),
        (combined("s", {**DOC_TRADE, "p": "NaN"}), "invalid_field"),
        (combined("s", {**DOC_TRADE, "p": "Infinity"}), "invalid_field"),
        (combined("s", {**DOC_TRADE, "p": "-1"}), "invalid_field"),
        (combined("s", {**DOC_TRADE, "p": "1e400"}), "invalid_field"),
        (combined("s", {**DOC_TRADE, "t": True}), "invalid_field"),
        (combined("s", {**DOC_TRADE, "t": 1.5}), "invalid_field"),
        (combined("s", {**DOC_TRADE, "T": "yesterday"}), "invalid_field"),
        (combined("s", {**DOC_BOOK, "b": None}), "invalid_field"),
        (combined("s", {"e": "kline", "s": "BNBBTC"}), "unknown_event"),
    ],
    ids=["text", "not-utf8", "array", "data-array", "no-symbol", "price-text", "price-nan", "price-inf",
         "price-negative", "price-overflow", "id-bool", "id-float", "time-text", "bid-null", "unsubscribed-event"],
)  # fmt: skip
def test_frames_the_docs_do_not_describe_are_refused_with_a_reason(frame: str | bytes, reason: str) -> None:
    with pytest.raises(InvalidMessageError) as refused:
        BinanceSpot().parse(frame, RECEIVED)
    assert refused.value.reason == reason


def test_symbols_are_spread_over_connections_within_the_venues_stream_limit() -> None:
    urls = BinanceSpot("ws://venue:1").connections([f"S{i}USDT" for i in range(600)])  # 1,200 streams
    streams = [url.split("streams=", 1)[1].split("/") for url in urls]
    assert [len(s) for s in streams] == [1024, 176]
    assert streams[0][:2] == ["s0usdt@trade", "s0usdt@bookTicker"]
    assert urls[0].startswith("ws://venue:1/stream?streams=")


def tick(seq: int) -> Tick:
    return Tick(tick_id=f"t{seq}", symbol="BTCUSDT", event_ts=1_700_000_000_000, price=1.0, source_seq=seq)


def test_a_jump_in_trade_ids_is_a_gap_and_a_repeat_is_dropped() -> None:
    gateway = LiveGateway(ServiceSettings(SERVICE_NAME="live-gateway", SYMBOLS="BTCUSDT"), BinanceSpot())  # type: ignore[call-arg]
    gaps = {"venue": "binance", "symbol": "BTCUSDT"}
    before = REGISTRY.get_sample_value("tradingstack_live_missed_trades_total", gaps) or 0
    assert [gateway.in_sequence(tick(s)) for s in (7, 8, 8, 6, 12, 13)] == [True, True, False, False, True, True]
    assert (REGISTRY.get_sample_value("tradingstack_live_missed_trades_total", gaps) or 0) - before == 3


def test_connection_attempts_wait_once_the_venues_allowance_is_spent() -> None:
    async def attempts() -> list[float]:
        limiter, stop, started = ConnectLimiter(2, window=0.5), asyncio.Event(), time.monotonic()
        times = []
        for _ in range(3):
            await limiter.wait(stop)
            times.append(time.monotonic() - started)
        return times

    _, second, third = asyncio.run(attempts())
    assert second < 0.2 <= 0.45 <= third  # the third waited for the first to leave the window


class VenueServer:
    """A local WebSocket server speaking Binance's combined-stream format. Each connection plays the
    next script: frames in order, None to drop the connection there; after its last frame it stays
    open and silent."""

    def __init__(self, scripts: list[list[str | None]]) -> None:
        self.scripts = scripts
        self.port = free_port()
        self.paths: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handler(self, connection: ServerConnection) -> None:
        index = len(self.paths)
        self.paths.append(connection.request.path if connection.request else "")
        for frame in self.scripts[index] if index < len(self.scripts) else []:
            if frame is None:
                return  # the handler ends: the server closes the connection mid-stream
            await connection.send(frame)
            await asyncio.sleep(0.02)
        await connection.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def __enter__(self) -> VenueServer:
        self.thread.start()

        async def start() -> Any:
            return await serve(self.handler, "127.0.0.1", self.port)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *_: Any) -> None:
        async def stop() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def trade(seq: int, price: float, at_ms: int) -> str:
    return combined("btcusdt@trade", {**DOC_TRADE, "s": "BTCUSDT", "t": seq, "p": f"{price:.2f}", "q": "0.5",
                                      "T": at_ms, "E": at_ms})  # fmt: skip


@pytest.fixture
def platform(tmp_path: Path, s3_url: str) -> Iterator[Platform]:
    services = {"live-gateway": {"enabled": True}}
    with running_platform(tmp_path, s3_url, symbols=["BTCUSDT"], services=services) as running:
        yield running


def test_live_trades_reach_bars_and_delta_through_disconnects_bad_frames_and_silence(platform: Platform) -> None:
    minute = 1_767_346_200_000  # 2026-01-02 09:30 UTC
    book = combined("btcusdt@bookTicker", {**DOC_BOOK, "s": "BTCUSDT", "b": "99.50", "a": "100.50"})
    scripts: list[list[str | None]] = [
        [book, trade(100, 100.0, minute), trade(101, 102.0, minute + 1_000), "{not json", trade(102, 99.0,
         minute + 2_000), None],  # then the venue drops the connection
        [trade(105, 101.0, minute + 3_000), trade(105, 101.0, minute + 3_000), trade(106, 103.0, minute + 4_000)],
    ]  # fmt: skip
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret"}
    missed = {"venue": "binance", "symbol": "BTCUSDT"}
    missed_before = REGISTRY.get_sample_value("tradingstack_live_missed_trades_total", missed) or 0
    with VenueServer(scripts) as venue, contextlib.ExitStack() as stack:
        settings = platform.settings(ServiceName.LIVE).model_copy(
            update={"LIVE_WS_URL": venue.url, "LIVE_STALE_SECONDS": 2.0, "LIVE_RECONNECT_MAX_SECONDS": 0.5}
        )
        gateway = stack.enter_context(LiveServer(live.create(settings)))
        stack.enter_context(LiveServer(normalizer.create(platform.settings(ServiceName.NORMALIZER))))
        stack.enter_context(
            LiveServer(sink.create_ticks(platform.settings(ServiceName.SINK_TICKS).model_copy(update=credentials)))
        )
        wait_for(lambda: len(platform.messages("MARKET_TICKS")) >= 5, 20, "five live trades on the tick stream")
        ticks = [json.loads(data) for _, data in platform.messages("MARKET_TICKS")]
        assert [t["trade_id"] for t in ticks] == ["100", "101", "102", "105", "106"]  # 105 twice: stored once
        assert all(t["receive_ts"] and t["venue"] == "binance" for t in ticks)
        assert (ticks[0]["bid"], ticks[0]["ask"], ticks[0]["side"]) == (99.5, 100.5, "sell")
        assert venue.paths[:2] == ["/stream?streams=btcusdt@trade/btcusdt@bookTicker"] * 2  # resubscribed
        letters = [(s, d) for s, d in platform.messages("DEAD_LETTER")]
        assert letters == [("dlq.BINANCE.malformed_frame", b"{not json")]
        missed_now = REGISTRY.get_sample_value("tradingstack_live_missed_trades_total", missed) or 0
        assert missed_now - missed_before == 2  # trades 103 and 104
        # The feed goes silent: not ready, naming the symbol, and the connection is opened again.
        _, body = wait_for(lambda: (r := gateway.get("/readyz"))[0] == 503 and r, 10, "a stale feed")
        assert "BTCUSDT" in json.dumps(body)
        assert REGISTRY.get_sample_value("tradingstack_live_stale_symbols", {"venue": "binance"}) == 1
        wait_for(lambda: len(venue.paths) >= 3, 15, "a reconnect after the silence")
        # Through the normalizer: the minute's bar from the five trades; through the sink: Delta.
        rows = wait_for(lambda: [r for r in platform.questdb.state.tables["ohlcv_1m"].rows if r["trades"] == 5]
                        or None, 20, "the minute's bar")  # fmt: skip
        assert (rows[0]["open"], rows[0]["high"], rows[0]["low"], rows[0]["close"]) == (100.0, 103.0, 99.0, 103.0)
        lake_settings = platform.settings(ServiceName.SINK_TICKS).model_copy(update=credentials)
        uri = MARKET_TICKS.uri(lake_settings.S3_BUCKET)

        def stored() -> list[dict[str, Any]] | None:
            with contextlib.suppress(Exception):
                table = DeltaTable(uri, storage_options=lake_settings.storage_options()).to_pyarrow_table()
                found: list[dict[str, Any]] = table.to_pylist()
                return found if len(found) == 5 else None
            return None

        delta = wait_for(stored, 20, "five rows in lake/market_ticks")
        # The sink's own fetch loop exports its consumer's lag, as every other consumer does.
        sink_lag = {"stream": "MARKET_TICKS", "durable": lake_settings.NATS_DURABLE}
        assert REGISTRY.get_sample_value("tradingstack_consumer_pending_messages", sink_lag) == 0
        assert sorted(r["trade_id"] for r in delta) == ["100", "101", "102", "105", "106"]
        assert all(r["receive_ts"] is not None for r in delta)


def test_a_trade_read_while_nats_is_away_is_published_once_nats_answers_again() -> None:
    class NatsComingBack:
        """JetStream refusing the first two publishes, as while the server restarts."""

        def __init__(self) -> None:
            self.attempts = 0
            self.stored: list[tuple[str, bytes]] = []

        async def publish(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
            self.attempts += 1
            if self.attempts <= 2:
                raise ConnectionError("nats: connection closed")
            self.stored.append((subject, data))

    gateway = LiveGateway(ServiceSettings(SERVICE_NAME="live-gateway", SYMBOLS="BTCUSDT"), BinanceSpot())  # type: ignore[call-arg]
    js = NatsComingBack()
    frame = trade(7, 100.0, 1_767_346_200_000)
    asyncio.run(gateway.handle(js, frame, asyncio.Event()))
    assert js.attempts == 3
    assert [(s, json.loads(d)["trade_id"]) for s, d in js.stored] == [("market.tick.BTCUSDT", "7")]
