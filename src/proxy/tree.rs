//! The owner of a blob as its tracker (#23): the fan-out tree.
//!
//! With one owner per blob, a cold rollout moves the bottleneck from the
//! registry's uplink to the owner's: N nodes need N−1 copies from one
//! node (8 nodes on 100 Mbit/s links: the slowest took 6.95× one node
//! alone). The owner sees every node that asks it for a blob, so it can
//! spread them: once it serves a blob to `peers.fanout` nodes, it sends the
//! next asker to a node that is downloading or holds the blob and serves
//! fewer than `fanout` of its own (see [`super::peers`] for the answer and
//! [`super::coalesce`] for serving a download as it grows). The nodes form
//! a tree in which no node serves more than `fanout` copies of a blob at
//! once, ranked by when they asked: the first to ask has the most bytes.
//!
//! This module is the pure part: what the owner remembers of a blob and
//! whom it names. It does no I/O, and its memory is bounded
//! ([`MAX_BLOBS`] blobs, [`MAX_NODES`] nodes each, records dropped after
//! [`FORGET_AFTER`] without an ask).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::route::Digest;

/// `peers.fanout` by default: the owner and every relay serve a blob to at
/// most one node at once, so each link carries one copy and every node
/// receives at the full rate of its link (see the README's sharing section
/// for the trade against a deeper tree).
pub const DEFAULT_FANOUT: usize = 1;
/// The largest `peers.fanout` accepted.
pub const MAX_FANOUT: usize = 64;
/// A blob's record is dropped once no node has asked for it this long.
pub const FORGET_AFTER: Duration = Duration::from_secs(120);
/// Blobs remembered at once; past it the least recently asked go first.
pub const MAX_BLOBS: usize = 1024;
/// Nodes remembered per blob (a peer set is a cluster's nodes).
pub const MAX_NODES: usize = 4096;

/// The owner's answer to a node that asks for a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Serve it (a direct child of the owner).
    Serve,
    /// Ask this node instead.
    Relay(SocketAddr),
}

#[derive(Debug)]
struct Node {
    addr: SocketAddr,
    /// Nodes sent to it.
    children: usize,
    /// Named no more: it failed one of its children.
    failed: bool,
}

#[derive(Debug)]
struct Blob {
    /// Direct children being served now.
    serving: usize,
    /// Every node that asked, in the order it first asked.
    nodes: Vec<Node>,
    asked: Instant,
}

/// What the owner remembers, by blob.
#[derive(Debug)]
pub struct Tracker {
    fanout: usize,
    blobs: HashMap<Digest, Blob>,
}

impl Tracker {
    /// `fanout` 0: never name another node (one owner serves everyone, as
    /// before #23).
    pub fn new(fanout: usize) -> Tracker {
        Tracker {
            fanout,
            blobs: HashMap::new(),
        }
    }

    pub fn fanout(&self) -> usize {
        self.fanout
    }

    /// `asker` asks for `digest`. `direct`: it must be served here (a
    /// relay it was sent to failed it, or it resumes); `failed`: the relay
    /// that failed it, named no more for this blob. [`Answer::Serve`]
    /// counts a direct child until [`Tracker::done`].
    pub fn ask(
        &mut self,
        digest: &Digest,
        asker: SocketAddr,
        direct: bool,
        failed: Option<SocketAddr>,
        now: Instant,
    ) -> Answer {
        if self.fanout == 0 {
            return Answer::Serve;
        }
        self.forget_old(now);
        if !self.blobs.contains_key(digest) && self.blobs.len() >= MAX_BLOBS {
            // Bounded: the least recently asked blob goes.
            if let Some(oldest) = self
                .blobs
                .iter()
                .min_by_key(|(_, b)| b.asked)
                .map(|(d, _)| d.clone())
            {
                self.blobs.remove(&oldest);
            }
        }
        let fanout = self.fanout;
        let blob = self.blobs.entry(digest.clone()).or_insert(Blob {
            serving: 0,
            nodes: Vec::new(),
            asked: now,
        });
        blob.asked = now;
        if let Some(f) = failed {
            if let Some(n) = blob.nodes.iter_mut().find(|n| n.addr == f) {
                n.failed = true;
            }
        }
        if !blob.nodes.iter().any(|n| n.addr == asker) && blob.nodes.len() < MAX_NODES {
            blob.nodes.push(Node {
                addr: asker,
                children: 0,
                failed: false,
            });
        }
        if direct || blob.serving < fanout {
            blob.serving += 1;
            return Answer::Serve;
        }
        // The earliest asker with room: it has the most of the blob, and
        // filling the tree level by level keeps it about log(N) deep.
        let relay = blob
            .nodes
            .iter_mut()
            .find(|n| n.addr != asker && !n.failed && n.children < fanout);
        match relay {
            Some(n) => {
                n.children += 1;
                Answer::Relay(n.addr)
            }
            // Every node is full (more askers than the tree holds yet):
            // served here, as without the tree.
            None => {
                blob.serving += 1;
                Answer::Serve
            }
        }
    }

    /// A direct child of `digest` finished or went away.
    pub fn done(&mut self, digest: &Digest) {
        if let Some(b) = self.blobs.get_mut(digest) {
            b.serving = b.serving.saturating_sub(1);
        }
    }

    /// `asker` was not served after all (the blob could not be had): it
    /// holds nothing, so it is named to no one.
    pub fn not_served(&mut self, digest: &Digest, asker: SocketAddr) {
        if let Some(b) = self.blobs.get_mut(digest) {
            b.serving = b.serving.saturating_sub(1);
            b.nodes.retain(|n| n.addr != asker);
        }
    }

    fn forget_old(&mut self, now: Instant) {
        self.blobs
            .retain(|_, b| b.serving > 0 || now.duration_since(b.asked) < FORGET_AFTER);
    }

    /// Blobs remembered (for tests).
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u32) -> Digest {
        Digest::parse(&format!("sha256:{i:064x}")).unwrap()
    }

    fn node(i: u8) -> SocketAddr {
        format!("10.0.0.{i}:5052").parse().unwrap()
    }

    /// The parent of each node when `n` nodes ask at once, none finishing:
    /// `None` for a direct child of the owner.
    fn parents(fanout: usize, n: u8) -> Vec<Option<SocketAddr>> {
        let mut t = Tracker::new(fanout);
        let now = Instant::now();
        (1..=n)
            .map(|i| match t.ask(&d(1), node(i), false, None, now) {
                Answer::Serve => None,
                Answer::Relay(a) => Some(a),
            })
            .collect()
    }

    fn index(a: SocketAddr) -> usize {
        match a.ip() {
            std::net::IpAddr::V4(v4) => usize::from(v4.octets()[3]) - 1,
            std::net::IpAddr::V6(_) => unreachable!("the tests use IPv4"),
        }
    }

    fn depth(parents: &[Option<SocketAddr>], i: usize) -> usize {
        let mut depth = 1;
        let mut cur = parents[i];
        // Bounded: a parent always asked earlier, so the index falls.
        while let Some(p) = cur {
            depth += 1;
            cur = parents[index(p)];
        }
        depth
    }

    #[test]
    fn no_node_serves_more_than_fanout_and_the_tree_is_log_deep() {
        for fanout in [1usize, 2, 3] {
            let p = parents(fanout, 15);
            let direct = p.iter().filter(|x| x.is_none()).count();
            assert_eq!(direct, fanout, "fanout {fanout}: {p:?}");
            for i in 1..=15u8 {
                let children = p.iter().filter(|x| **x == Some(node(i))).count();
                assert!(
                    children <= fanout,
                    "fanout {fanout}: node {i} has {children}"
                );
            }
            let deepest = (0..15).map(|i| depth(&p, i)).max().unwrap();
            // A full fanout-ary tree below the owner: 15 nodes fit in
            // depth 4 with fanout 2 (2+4+8 < 15 <= 2+4+8+16), 15 with 1.
            let expect = match fanout {
                1 => 15,
                2 => 4,
                _ => 3,
            };
            assert_eq!(deepest, expect, "fanout {fanout}: {p:?}");
        }
    }

    #[test]
    fn fanout_zero_is_one_owner_serving_everyone() {
        assert!(parents(0, 8).iter().all(Option::is_none));
    }

    #[test]
    fn a_failed_relay_is_named_no_more_and_its_child_is_served_directly() {
        let mut t = Tracker::new(1);
        let now = Instant::now();
        assert_eq!(t.ask(&d(1), node(1), false, None, now), Answer::Serve);
        assert_eq!(
            t.ask(&d(1), node(2), false, None, now),
            Answer::Relay(node(1))
        );
        // Node 1 failed node 2: node 2 is served here, node 1 not named.
        assert_eq!(
            t.ask(&d(1), node(2), true, Some(node(1)), now),
            Answer::Serve
        );
        assert_eq!(
            t.ask(&d(1), node(3), false, None, now),
            Answer::Relay(node(2))
        );
        // Node 2 has its one child: the next in line is node 3.
        assert_eq!(
            t.ask(&d(1), node(4), false, None, now),
            Answer::Relay(node(3))
        );
    }

    #[test]
    fn direct_children_that_finish_make_room_and_records_are_forgotten() {
        let mut t = Tracker::new(1);
        let now = Instant::now();
        assert_eq!(t.ask(&d(1), node(1), false, None, now), Answer::Serve);
        t.done(&d(1));
        assert_eq!(t.ask(&d(1), node(2), false, None, now), Answer::Serve);
        // A node that asked but was not served is named to no one, and
        // leaves room.
        t.not_served(&d(1), node(2));
        assert_eq!(t.ask(&d(1), node(3), false, None, now), Answer::Serve);
        assert_eq!(
            t.ask(&d(1), node(4), false, None, now),
            Answer::Relay(node(1))
        );
        assert_eq!(
            t.ask(&d(1), node(5), false, None, now),
            Answer::Relay(node(3))
        );
        t.done(&d(1));
        assert_eq!(t.len(), 1);
        t.ask(&d(2), node(1), false, None, now + FORGET_AFTER);
        assert_eq!(t.len(), 1, "the first blob's record was dropped");
    }

    #[test]
    fn memory_is_bounded() {
        let mut t = Tracker::new(2);
        let now = Instant::now();
        for i in 0..(MAX_BLOBS as u32 + 10) {
            t.ask(
                &d(i),
                node(1),
                false,
                None,
                now + Duration::from_millis(i as u64),
            );
            t.done(&d(i));
        }
        assert_eq!(t.len(), MAX_BLOBS);
    }
}
