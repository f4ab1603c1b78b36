#!/usr/bin/env python3
"""Median [min–max] per server and scenario from compare.sh's CSV (stdin or files)."""
import csv
import fileinput
import statistics
from collections import defaultdict

FIELDS = ("round,server,scenario,load1,wall_s,transmit_s,sent,recv,lost,lost_pct,server_cpu_s,"
          "rss_start_kb,vmhwm_kb,rss_kb,new_server_sockets,server_sock_drops,other_udp_drops").split(",")
rows = [r for r in csv.DictReader((l for l in fileinput.input() if not l.startswith("#")),
                                  fieldnames=FIELDS)
        if r["round"] != "round"]
groups = defaultdict(list)
for r in rows:
    groups[(r["scenario"], r["server"])].append(r)


def fmt(values, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def num(r, k):
    try:
        return float(r[k])
    except (KeyError, ValueError, TypeError):  # older CSVs lack the drop columns
        return None


print("| scenario | server | runs | load1 | loss % | recv pkt/s | server CPU s / 1M recv pkts "
      "| peak RSS MiB | RSS MiB at end | new server sockets | drops in server sockets "
      "| other UDP drops (uclient) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for (scen, server), rs in sorted(groups.items()):
    rate = [num(r, "recv") / num(r, "transmit_s") for r in rs
            if num(r, "recv") and num(r, "transmit_s")]
    cpu = [num(r, "server_cpu_s") / num(r, "recv") * 1e6 for r in rs if num(r, "recv")]
    print(f"| {scen} | {server} | {len(rs)} | {fmt([num(r, 'load1') for r in rs], 2)} "
          f"| {fmt([num(r, 'lost_pct') for r in rs], 2)} | {fmt(rate, 0)} | {fmt(cpu, 1)} "
          f"| {fmt([num(r, 'vmhwm_kb') / 1024 for r in rs])} "
          f"| {fmt([num(r, 'rss_kb') / 1024 for r in rs])} "
          f"| {fmt([num(r, 'new_server_sockets') for r in rs], 0)} "
          f"| {fmt([num(r, 'server_sock_drops') for r in rs], 0)} "
          f"| {fmt([num(r, 'other_udp_drops') for r in rs], 0)} |")
