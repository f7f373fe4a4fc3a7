//! TCP load tool for `hack/userspace-bench.sh`: a server, a bulk sender and a connection
//! latency prober, std only, so the same tool measures the direct path and the proxied one.
//!
//! ```text
//! tcp_bench server ADDR            accept forever; "b" connections are drained, "p" ones
//!                                  get their first byte echoed and are closed
//! tcp_bench bulk ADDR SECONDS [STREAMS]  send as fast as possible; prints "bulk <Gbit/s>"
//! tcp_bench latency ADDR COUNT     COUNT sequential connect + 1-byte round trip + close;
//!                                  prints "latency p50_us=.. p99_us=.. mean_us=.."
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn serve(addr: &str) {
    let listener = TcpListener::bind(addr).expect("bind");
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 1 << 18];
            let mut first = [0u8; 1];
            if s.read_exact(&mut first).is_err() {
                return;
            }
            if first[0] == b'p' {
                let _ = s.write_all(&first);
                let _ = s.shutdown(Shutdown::Write);
                // Wait for the client's close so the server never holds TIME_WAIT.
                let _ = s.read(&mut buf);
                return;
            }
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        });
    }
}

fn bulk(addr: &str, seconds: f64, streams: usize) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..streams)
        .map(|_| {
            let addr = addr.to_string();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).expect("connect");
                s.write_all(b"b").expect("write");
                let buf = vec![0x5au8; 1 << 18];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    s.write_all(&buf).expect("write");
                    sent += buf.len() as u64;
                }
                let _ = s.shutdown(Shutdown::Write);
                let mut rest = [0u8; 16];
                let _ = s.read(&mut rest);
                sent
            })
        })
        .collect();
    let total: u64 = workers.into_iter().map(|w| w.join().expect("worker")).sum();
    let secs = start.elapsed().as_secs_f64();
    println!("bulk {:.3}", total as f64 * 8.0 / secs / 1e9);
}

fn latency(addr: &str, count: usize) {
    let mut samples: Vec<f64> = Vec::with_capacity(count);
    let mut one = [0u8; 1];
    for _ in 0..count {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).expect("connect");
        let _ = s.set_nodelay(true);
        s.write_all(b"p").expect("write");
        s.read_exact(&mut one).expect("read");
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        drop(s);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    println!(
        "latency p50_us={:.0} p99_us={:.0} mean_us={:.0}",
        pct(0.5),
        pct(0.99),
        mean
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(1) {
        "server" => serve(arg(2)),
        "bulk" => bulk(
            arg(2),
            arg(3).parse().expect("seconds"),
            arg(4).parse().unwrap_or(1),
        ),
        "latency" => latency(arg(2), arg(3).parse().expect("count")),
        _ => {
            eprintln!(
                "usage: tcp_bench server ADDR | bulk ADDR SECONDS [STREAMS] | latency ADDR COUNT"
            );
            std::process::exit(2);
        }
    }
}
