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
    /// Positions (counted down in `remaining`) at which the event is a bounce, sorted ascending: the next one, the largest, is last (`pop`).
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
        let bounces = if self.domains.is_multiple_of(CATCH_ALL_EVERY) {
            0
        } else {
            BOUNCES_PER_DOMAIN.min(total)
        };
        let mut bounces_at: Vec<u32> = sample(&mut self.rng, total as usize, bounces as usize)
            .into_iter()
            .map(|i| i as u32 + 1)
            .collect();
        // Ascending: `remaining` counts down, so the largest position comes first (`last()`).
        bounces_at.sort_unstable();
        Plan {
            domain: format!("{name}.{tld}"),
            remaining: total,
            bounces_at,
        }
    }
}

impl Plan {
    /// The kind of the domain's next event: bounced at the planned positions.
    fn next_kind(&mut self) -> EventType {
        let kind = if self.bounces_at.last() == Some(&self.remaining) {
            self.bounces_at.pop();
            EventType::Bounced
        } else {
            EventType::Delivered
        };
        self.remaining -= 1;
        kind
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
        let kind = plan.next_kind();
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

    /// Every domain gets its planned bounces (three, or all its events if it has fewer), but
    /// every 25th, which never bounces (SPEC §7).
    #[test]
    fn each_domain_gets_three_bounces_but_every_25th() {
        let mut generator = Generator::new(7);
        for n in 1..=2_000u64 {
            let mut plan = generator.new_plan();
            let total = plan.remaining;
            let bounces = (0..total)
                .filter(|_| plan.next_kind() == EventType::Bounced)
                .count() as u32;
            let want = if n % CATCH_ALL_EVERY == 0 {
                0
            } else {
                total.min(BOUNCES_PER_DOMAIN)
            };
            assert_eq!(bounces, want, "domain {n} of {total} events");
        }
    }

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
