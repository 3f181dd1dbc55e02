//! The synthetic stream of the original assignment's generator (SPEC §7).
//!
//! Random 14-letter domains under net/com/org/io/gov; each domain gets a random 0–2,499 events,
//! interleaved with the other domains that are active at the same time; about three bounces per
//! domain spread over its events, except every 25th domain, which never bounces (the catch-all
//! ones). The same seed gives the same stream.

use catchall::event::{Event, EventType};
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};

const TLDS: [&str; 5] = ["net", "com", "org", "io", "gov"];
const MAX_EVENTS_PER_DOMAIN: u32 = 2_500;
const BOUNCES_PER_DOMAIN: u32 = 3;
/// Every this many domains, one never bounces.
const CATCH_ALL_EVERY: u64 = 25;
/// Domains whose events are interleaved at any one time.
const ACTIVE_DOMAINS: usize = 16;

struct Plan {
    domain: String,
    remaining: u32,
    /// Positions (counted down in `remaining`) at which the event is a bounce, sorted descending.
    bounces_at: Vec<u32>,
}

/// An endless, reproducible stream of events.
pub struct Generator {
    rng: StdRng,
    active: Vec<Plan>,
    domains: u64,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            active: Vec::with_capacity(ACTIVE_DOMAINS),
            domains: 0,
        }
    }

    fn new_plan(&mut self) -> Plan {
        self.domains += 1;
        let name: String = (0..14)
            .map(|_| char::from(b'a' + self.rng.random_range(0..26u8)))
            .collect();
        let tld = TLDS[self.rng.random_range(0..TLDS.len())];
        let total = self.rng.random_range(0..MAX_EVENTS_PER_DOMAIN);
        let bounces = if self.domains % CATCH_ALL_EVERY == 0 {
            0
        } else {
            BOUNCES_PER_DOMAIN.min(total)
        };
        let mut bounces_at: Vec<u32> = sample(&mut self.rng, total as usize, bounces as usize)
            .into_iter()
            .map(|i| i as u32 + 1)
            .collect();
        bounces_at.sort_unstable_by(|a, b| b.cmp(a));
        Plan {
            domain: format!("{name}.{tld}"),
            remaining: total,
            bounces_at,
        }
    }
}

impl Iterator for Generator {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        while self.active.len() < ACTIVE_DOMAINS {
            let plan = self.new_plan();
            if plan.remaining > 0 {
                self.active.push(plan);
            }
        }
        let index = self.rng.random_range(0..self.active.len());
        let plan = &mut self.active[index];
        let kind = if plan.bounces_at.last() == Some(&plan.remaining) {
            plan.bounces_at.pop();
            EventType::Bounced
        } else {
            EventType::Delivered
        };
        plan.remaining -= 1;
        let event = Event {
            domain: plan.domain.clone(),
            kind,
            evidence: None,
        };
        if plan.remaining == 0 {
            self.active.swap_remove(index);
        }
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn has_the_assignment_shape_and_is_reproducible() {
        let events: Vec<Event> = Generator::new(7).take(200_000).collect();
        assert_eq!(events, Generator::new(7).take(200_000).collect::<Vec<_>>());
        assert_ne!(
            events[..100],
            Generator::new(8).take(100).collect::<Vec<_>>()[..]
        );

        let mut per_domain: HashMap<&str, (u32, u32)> = HashMap::new();
        for event in &events {
            assert_eq!(
                catchall::event::normalize_domain(&event.domain).as_deref(),
                Ok(event.domain.as_str())
            );
            let (name, tld) = event.domain.split_once('.').unwrap();
            assert_eq!(name.len(), 14);
            assert!(TLDS.contains(&tld));
            let entry = per_domain.entry(&event.domain).or_default();
            match event.kind {
                EventType::Delivered => entry.0 += 1,
                EventType::Bounced => entry.1 += 1,
            }
        }
        assert!(
            per_domain
                .values()
                .all(|&(d, b)| d + b < MAX_EVENTS_PER_DOMAIN && b <= 3)
        );
        let never_bounced = per_domain.values().filter(|&&(_, b)| b == 0).count();
        let catch_all = per_domain
            .values()
            .filter(|&&(d, b)| b == 0 && d > 1000)
            .count();
        assert!(
            never_bounced >= per_domain.len() / 40,
            "about one domain in 25 never bounces"
        );
        assert!(
            catch_all >= 1,
            "some never-bounced domain passes the threshold"
        );
        // Interleaved: the first 100 events name several domains.
        let first: std::collections::HashSet<_> = events[..100].iter().map(|e| &e.domain).collect();
        assert!(first.len() > 4);
    }
}
