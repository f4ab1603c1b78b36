#!/usr/bin/env python3
"""callgate-load across a cluster, interleaved (docs/PERFORMANCE.md, "Across nodes"): a single node
without Redis vs two nodes sharing one redis-server, with every pair across the nodes (cross) and
within them (local); open loop, PAIRS pairs at RATE round trips/s; prints each run and the medians,
with each process's CPU per forwarded message and the Redis commands of each run.

The two nodes have direct links (cluster-listen): cross-node messages skip Redis. Two more nodes
without links on the same Redis give `cross-redis` (every cross-node message a PUBLISH), to
compare in one sitting; LINKS=0 runs only nodes without links (single, cross, local as before).

Usage: cargo build --release --bin callgate --bin callgate-load
       python3 benches/cluster_load.py [ROUNDS=3] [PAIRS=500] [RATE=5000]
Needs redis-server and redis-cli; binds only 127.0.0.1 ports the OS picks, and kills what it starts.

Environment (all optional):
  CALLGATE_BIN_DIR=DIR   take callgate and callgate-load from DIR (e.g. a copy of an older build, to
                         compare before/after in one sitting) instead of target/release
  PIN_NODES=CPUS         run the nodes (and the single node) under `taskset -c CPUS`
  PIN_REST=CPUS          run redis-server and the load generator under `taskset -c CPUS`
  LINKS=0                no direct links at all (default: a linked pair, and an unlinked pair for
                         the cross-redis runs)
  PERF=1                 count, per process and per forwarded message, system calls (all, and the
                         socket ones) and context switches with `perf stat` (software events and
                         syscall tracepoints: they do not move with the machine's load)
"""
import json, os, resource, socket, statistics, subprocess, sys, tempfile, threading, time
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN_DIR = os.environ.get('CALLGATE_BIN_DIR', f'{ROOT}/target/release')
BIN = f'{BIN_DIR}/callgate'
LOAD = f'{BIN_DIR}/callgate-load'
def pinned(var):
    cpus = os.environ.get(var)
    return ['taskset', '-c', cpus] if cpus else []
PERF = os.environ.get('PERF') == '1'
PERF_EVENTS = ['raw_syscalls:sys_enter', 'context-switches', 'syscalls:sys_enter_recvfrom', 'syscalls:sys_enter_sendto',
               'syscalls:sys_enter_writev', 'syscalls:sys_enter_read', 'syscalls:sys_enter_write',
               'syscalls:sys_enter_epoll_wait', 'syscalls:sys_enter_futex']
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
PAIRS, RATE, DUR, WARM = (sys.argv[2] if len(sys.argv) > 2 else '500'), (sys.argv[3] if len(sys.argv) > 3 else '5000'), '10', '2'
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(20000, hard), hard))
def free():
    s = socket.socket(); s.bind(('127.0.0.1', 0)); p = s.getsockname()[1]; s.close(); return p
tmp = tempfile.mkdtemp(prefix='xbrowser-perf-')
certs = f'{tmp}/certs'
procs = []
def node(extra):
    port = free()
    args = pinned('PIN_NODES') + [BIN, '--https-listen', f'127.0.0.1:{port}', '--http-listen', 'off', '--metrics-listen', 'off',
            '--listening-ip', '127.0.0.1', '--listening-port', '0', '--tls-listening-port', 'off',
            '--log-format', 'json', '--log-level', 'info', '--max-connections', '19500',
            '--connections-per-ip', '100000', '--ws-upgrades-per-second', '100000',
            '--ws-connections-per-ip', '100000', '--ws-messages-per-second', '100000',
            '--ws-message-burst', '100000', '--ws-calls-per-minute', '100000',
            '--certs-dir', certs, '--public-dir', f'{ROOT}/public'] + extra
    p = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    procs.append(p)
    ready = threading.Event()
    def drain():
        for line in p.stderr:
            if 'callgate ready' in line: ready.set()
            elif '"WARN"' in line or '"ERROR"' in line: sys.stderr.write(line)
    threading.Thread(target=drain, daemon=True).start()
    assert ready.wait(30), 'node not ready'
    return port, p.pid
try:
    rport = free()
    redis = subprocess.Popen(pinned('PIN_REST') + ['redis-server', '--port', str(rport), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(redis)
    time.sleep(0.5)
    single = node([])
    cl = ['--redis-url', f'redis://127.0.0.1:{rport}', '--static-auth-secret', 'perf-secret-0123456789abcdef', '--turn-host', '127.0.0.1']
    LINKS = os.environ.get('LINKS', '1') != '0'
    link = lambda: ['--cluster-listen', f'127.0.0.1:{free()}'] if LINKS else []
    a = node(cl + ['--node-id', 'perf-a'] + link())
    b = node(cl + ['--node-id', 'perf-b'] + link())
    if LINKS:
        c = node(cl + ['--node-id', 'perf-c'])
        d = node(cl + ['--node-id', 'perf-d'])
    time.sleep(3)
    kinds = {
        'single': ([f'127.0.0.1:{single[0]}'], [single[1]], []),
        'cross': ([f'127.0.0.1:{a[0]}', f'127.0.0.1:{b[0]}'], [a[1], b[1], redis.pid], ['--placement', 'cross']),
        'local': ([f'127.0.0.1:{a[0]}', f'127.0.0.1:{b[0]}'], [a[1], b[1], redis.pid], ['--placement', 'local']),
    }
    if LINKS:
        kinds['cross-redis'] = ([f'127.0.0.1:{c[0]}', f'127.0.0.1:{d[0]}'], [c[1], d[1], redis.pid], ['--placement', 'cross'])
    results = {k: [] for k in kinds}
    def cmdstats():
        out = subprocess.run(['redis-cli', '-p', str(rport), 'info', 'commandstats'], capture_output=True, text=True).stdout
        stats = {}
        for line in out.splitlines():
            if line.startswith('cmdstat_'):
                name, rest = line.split(':', 1)
                stats[name[8:]] = int(rest.split('calls=')[1].split(',')[0])
        return stats
    for r in range(ROUNDS):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))
        for k in order:
            targets, pids, extra = kinds[k]
            cmd = pinned('PIN_REST') + [LOAD, '--target', ','.join(targets), '--ca', f'{certs}/cert.pem', '--server-pid', ','.join(map(str, pids)),
                   'relay', '--pairs', PAIRS, '--rate', RATE, '--duration', DUR, '--warmup', WARM] + extra
            before = cmdstats()
            perfs = []
            if PERF:
                for i, pid in enumerate(pids):
                    f = f'{tmp}/perf-{k}-{r}-{i}.csv'
                    perfs.append((f, subprocess.Popen(['perf', 'stat', '-x,', '-o', f, '-e', ','.join(PERF_EVENTS), '-p', str(pid)],
                                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
                time.sleep(0.3)
            out = subprocess.run(cmd, capture_output=True, text=True)
            for f, p in perfs:
                p.send_signal(2); p.wait()
            after = cmdstats()
            diff = {c: after[c] - before.get(c, 0) for c in after if after[c] - before.get(c, 0) > 0}
            if not out.stdout.strip():
                print(k, 'FAILED', out.stderr[-2000:]); continue
            j = json.loads(out.stdout)
            j['redis_calls'] = diff
            # Every message forwarded while counted: the measured window's, scaled to warm-up + window, plus
            # the call set-ups (3 per pair); `perf stat` counts the whole run.
            total = j['round_trips'] * 2 * (int(DUR) + int(WARM)) / int(DUR) + 3 * int(PAIRS)
            j['perf'] = []
            for f, _ in perfs:
                counts = {}
                for line in open(f):
                    parts = line.strip().split(',')
                    if len(parts) > 2 and parts[0].replace('.', '').isdigit():
                        counts[parts[2].replace('syscalls:sys_enter_', '').replace('raw_syscalls:sys_enter', 'syscalls')] = int(float(parts[0])) / total
                j['perf'].append(counts)
            results[k].append(j)
            s = j['server']
            print(f"round {r} {k}: rt/s {j['round_trips_per_s']:.0f} p50 {j['latency']['p50_ms']} p99 {j['latency']['p99_ms']} p99.9 {j['latency']['p999_ms']} "
                  f"max {j['latency']['max_ms']} errors {j['errors']} lost {j['lost']} cpu/msg {s['cpu_us_per_message']} per-pid {s['cpu_s_per_pid']} "
                  f"lag p99 {j['send_lag']['p99_ms'] if j.get('send_lag') else None} redis {diff} (messages {j['round_trips']*2})", flush=True)
            for i, counts in enumerate(j['perf']):
                print(f"  pid{i} per message: " + ' '.join(f"{n} {v:.2f}" for n, v in counts.items()), flush=True)
    print('--- medians')
    for k, rs in results.items():
        if not rs: continue
        med = lambda f: statistics.median(f(x) for x in rs)
        msgs = lambda x: x['round_trips'] * 2
        print(f"{k}: n={len(rs)} p50 {med(lambda x: x['latency']['p50_ms'])} p99 {med(lambda x: x['latency']['p99_ms'])} "
              f"p99.9 {med(lambda x: x['latency']['p999_ms'])} cpu/msg {med(lambda x: x['server']['cpu_us_per_message']):.1f} us "
              + ' '.join(f"pid{i} {med(lambda x, i=i: x['server']['cpu_s_per_pid'][i] * 1e6 / msgs(x)):.1f}us" for i in range(len(rs[0]['server']['cpu_s_per_pid'])))
              + f" errors {sum(x['errors'] for x in rs)} lost {sum(x['lost'] for x in rs)}")
        for i in range(len(rs[0]['perf'])):
            names = rs[0]['perf'][i].keys()
            print(f"  pid{i} per message (medians): " + ' '.join(f"{n} {med(lambda x, i=i, n=n: x['perf'][i].get(n, 0)):.2f}" for n in names))
        if k != 'single':
            print(f"  redis PUBLISH per message: {med(lambda x: x['redis_calls'].get('publish', 0) / (x['round_trips'] * 2 * (int(DUR) + int(WARM)) / int(DUR) + 3 * int(PAIRS))):.3f}")
finally:
    for p in procs:
        p.kill(); p.wait()
    subprocess.run(['rm', '-rf', tmp])
