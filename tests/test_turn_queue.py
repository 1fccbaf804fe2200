"""A provider's turns run in placement order (`nodeagent.execution.TurnQueue`)."""

import random
import threading
import time

from nodeagent.execution import RunningTurn, TurnQueue


def test_turns_run_in_ticket_order_whatever_order_threads_arrive_in():
    queue = TurnQueue()
    tickets = [queue.ticket() for _ in range(12)]
    ran: list[int] = []
    arrivals = tickets[:]
    random.Random(7).shuffle(arrivals)

    def turn(ticket):
        queue.wait(ticket)
        ran.append(ticket)
        time.sleep(0.001)
        queue.release(ticket)

    threads = [threading.Thread(target=turn, args=(t,)) for t in arrivals]
    for thread in threads:
        thread.start()
        time.sleep(0.002)  # later tickets often arrive first
    for thread in threads:
        thread.join(5)
    assert ran == tickets
    assert not queue.busy()


def test_an_abandoned_ticket_does_not_stall_the_turns_behind_it():
    queue = TurnQueue()
    first, abandoned, third = queue.ticket(), queue.ticket(), queue.ticket()
    done = threading.Event()

    def run_third():
        queue.wait(third)
        done.set()

    thread = threading.Thread(target=run_third)
    thread.start()
    queue.wait(first)
    assert queue.busy()
    queue.release(first)
    assert not done.wait(0.05)  # still waiting for the second ticket
    queue.release(abandoned)  # e.g. its model failed to load
    assert done.wait(5)
    thread.join(5)
    queue.release(third)  # releasing twice is harmless
    queue.release(abandoned)
    assert not queue.busy()
    last = queue.ticket()
    queue.wait(last)  # nothing stalls it
    queue.release(last)


def test_a_running_turn_counts_by_its_time_left():
    turn = RunningTurn(ticket=0, since=100.0, estimate_s=2.0, prefill_tokens=500, decode_tokens=8)
    assert turn.remaining_s(100.5) == 1.5
    assert turn.remaining_s(103.0) == 0.0  # overran its estimate: nothing known is left
    assert RunningTurn(0, 100.0, None, 500, 8).remaining_s(101.0) is None


def test_a_running_turn_has_done_its_prompt_first_then_its_answer():
    # 500 prompt tokens at 1000 tok/s take 0.5 s; then 8 answer tokens at 20 tok/s.
    turn = RunningTurn(ticket=0, since=100.0, estimate_s=0.9, prefill_tokens=500, decode_tokens=8)
    assert turn.work_done(100.25, 1000.0, 20.0) == (250, 0)  # halfway through the prompt
    assert turn.work_done(100.625, 1000.0, 20.0) == (500, 2)  # the prompt done, two tokens out
    assert turn.work_done(105.0, 1000.0, 20.0) == (500, 8)  # never more than it has
    assert turn.work_done(100.6, None, 20.0) == (0, 0)  # a rate unknown: all of it still ahead
