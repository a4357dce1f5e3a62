#!/usr/bin/env escript
%%! +S 2 +P 4000000 -smp enable
%% Erlang baseline for the worknodes benchmark (run by bench/worknodes.sh):
%% memory per idle process with N processes, and ring message throughput.
%% Usage: escript bench/worknodes.erl [Actors Ring Tokens Hops]
-mode(compile).

main(Args) ->
    [Actors, Ring, Tokens, Hops] = case Args of
        [] -> [1000000, 1000, 1000, 5000];
        _ -> [list_to_integer(A) || A <- Args]
    end,
    erlang:garbage_collect(),
    Before = erlang:memory(total),
    Pids = [spawn(fun idle/0) || _ <- lists:seq(1, Actors)],
    After = erlang:memory(total),
    io:format("erlang     idle memory: ~8.1f bytes/actor (erlang:memory(total) delta)~n", [(After - Before) / Actors]),
    [P ! stop || P <- Pids],
    io:format("erlang     throughput:  ~8.2f M msgs/s (+S 2 schedulers)~n", [ring(Ring, Tokens, Hops) / 1.0e6]),
    halt(0).

idle() ->
    receive stop -> ok end.

ring(N, Tokens, Hops) ->
    Self = self(),
    Procs = [spawn(fun() -> relay(Self) end) || _ <- lists:seq(1, N)],
    Tuple = list_to_tuple(Procs),
    [P ! {next, element((I rem N) + 1, Tuple)} || {I, P} <- lists:zip(lists:seq(1, N), Procs)],
    T0 = erlang:monotonic_time(microsecond),
    [element((T rem N) + 1, Tuple) ! {hop, Hops} || T <- lists:seq(0, Tokens - 1)],
    wait(Tokens),
    T1 = erlang:monotonic_time(microsecond),
    [P ! stop || P <- Procs],
    Tokens * (Hops + 1) / ((T1 - T0) / 1.0e6).

relay(Parent) ->
    receive {next, Next} -> relay(Parent, Next) end.

relay(Parent, Next) ->
    receive
        {hop, 0} -> Parent ! done, relay(Parent, Next);
        {hop, H} -> Next ! {hop, H - 1}, relay(Parent, Next);
        stop -> ok
    end.

wait(0) -> ok;
wait(N) -> receive done -> wait(N - 1) end.
