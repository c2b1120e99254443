//! High Precision Event Timer (MMIO at 0xFED00000): a 64-bit main counter at 16.777216 MHz
//! and three comparators, each one-shot or periodic, 32- or 64-bit, edge or level.
//!
//! Comparators interrupt an IOAPIC pin chosen from `Tn_INT_ROUTE_CAP` (pins 20-23), or in
//! legacy replacement mode timer 0 on pin 2 (ISA IRQ 0 through the usual override) and timer 1
//! on pin 8. FSB (MSI) delivery is not offered. Time comes from the injected clock; the owner
//! calls `tick` at `next_deadline_ns`. Register accesses also bring the model up to date first,
//! so what the guest reads is always consistent with the clock.

use std::sync::Arc;

use super::clock::Clock;
use crate::devices::bus::BusDevice;

pub const HPET_BASE: u64 = 0xfed0_0000;
pub const HPET_LEN: u64 = 0x400;
/// Main counter frequency, as xhyve's.
pub const HPET_HZ: u64 = 16_777_216;
pub const HPET_TIMERS: usize = 3;
/// IOAPIC pins a comparator may be routed to outside legacy replacement mode.
pub const HPET_ROUTE_CAP: u32 = 0x00f0_0000;
/// Legacy replacement mode routes: timer 0 to ISA IRQ 0 (IOAPIC pin 2), timer 1 to IRQ 8.
pub const LEGACY_TIMER0_PIN: u32 = 2;
pub const LEGACY_TIMER1_PIN: u32 = 8;

const NS_PER_SEC: u128 = 1_000_000_000;
const FS_PER_SEC: u64 = 1_000_000_000_000_000;
/// The low half of the capabilities register, which the ACPI HPET table repeats: vendor
/// 0x8086, legacy replacement capable, 64-bit counter, three timers, revision 1.
pub const HPET_BLOCK_ID: u32 = 0x8086_a201;
const CAPABILITIES: u64 = (FS_PER_SEC / HPET_HZ) << 32 | HPET_BLOCK_ID as u64;

const REG_CAPABILITIES: u64 = 0x000;
const REG_CONFIG: u64 = 0x010;
const REG_INT_STATUS: u64 = 0x020;
const REG_MAIN_COUNTER: u64 = 0x0f0;
const REG_TIMER_BASE: u64 = 0x100;
const TIMER_STRIDE: u64 = 0x20;
const TIMER_CONFIG: u64 = 0x00;
const TIMER_COMPARATOR: u64 = 0x08;

const CONFIG_ENABLE: u64 = 1 << 0;
const CONFIG_LEGACY_ROUTE: u64 = 1 << 1;

const TN_LEVEL: u64 = 1 << 1;
const TN_INT_ENABLE: u64 = 1 << 2;
const TN_PERIODIC: u64 = 1 << 3;
const TN_PERIODIC_CAP: u64 = 1 << 4;
const TN_64BIT_CAP: u64 = 1 << 5;
const TN_VAL_SET: u64 = 1 << 6;
const TN_32BIT_MODE: u64 = 1 << 8;
const TN_ROUTE_SHIFT: u32 = 9;
const TN_ROUTE_MASK: u64 = 0x1f << TN_ROUTE_SHIFT;
const TN_WRITABLE: u64 =
    TN_LEVEL | TN_INT_ENABLE | TN_PERIODIC | TN_VAL_SET | TN_32BIT_MODE | TN_ROUTE_MASK;

/// Where comparator interrupts go: IOAPIC input pins (GSIs).
pub trait HpetIrqSink: Send + Sync {
    fn set_pin_level(&self, pin: u32, high: bool);
}

#[derive(Debug, Clone, Default)]
struct Timer {
    /// The writable `Tn_CONFIG` bits.
    config: u64,
    comparator: u64,
    period: u64,
    /// When the comparator next matches, in counter ticks since the HPET was enabled.
    fire_at: Option<u64>,
    /// The pin this timer holds high (level mode, status bit set).
    asserted_pin: Option<u32>,
}

impl Timer {
    fn is_32bit(&self) -> bool {
        self.config & TN_32BIT_MODE != 0
    }

    fn width_mask(&self) -> u64 {
        if self.is_32bit() {
            u64::from(u32::MAX)
        } else {
            u64::MAX
        }
    }

    fn route(&self) -> u32 {
        ((self.config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT) as u32
    }

    /// Ticks from a counter value to the comparator's next match, wrapping at the width.
    fn ticks_to_match(&self, counter: u64) -> Option<u64> {
        let delta = self.comparator.wrapping_sub(counter) & self.width_mask();
        match (delta, self.is_32bit()) {
            (0, true) => Some(1 << 32),
            (0, false) => None,
            (delta, _) => Some(delta),
        }
    }
}

pub struct Hpet {
    clock: Arc<dyn Clock>,
    sink: Arc<dyn HpetIrqSink>,
    config: u64,
    int_status: u64,
    /// The main counter when last enabled (or its frozen value while halted).
    counter_base: u64,
    enabled_at_ns: u64,
    timers: [Timer; HPET_TIMERS],
}

/// [`crate::intc::MIN_PERIODIC_NS`] in counter ticks.
const MIN_PERIODIC_TICKS: u64 = (crate::intc::MIN_PERIODIC_NS * HPET_HZ).div_ceil(1_000_000_000);

fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(HPET_HZ) / NS_PER_SEC) as u64
}

/// The shortest time after which `ns_to_ticks` reaches `ticks`.
fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * NS_PER_SEC).div_ceil(u128::from(HPET_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

impl Hpet {
    /// A halted HPET with its counter at 0 and every comparator disabled.
    pub fn new(clock: Arc<dyn Clock>, sink: Arc<dyn HpetIrqSink>) -> Self {
        Self {
            clock,
            sink,
            config: 0,
            int_status: 0,
            counter_base: 0,
            enabled_at_ns: 0,
            timers: Default::default(),
        }
    }

    /// Power-on: halted, counter 0, every comparator disabled; a pin a level timer held
    /// high goes low.
    pub fn power_on_reset(&mut self) {
        for timer in &self.timers {
            if let Some(pin) = timer.asserted_pin {
                self.sink.set_pin_level(pin, false);
            }
        }
        self.config = 0;
        self.int_status = 0;
        self.counter_base = 0;
        self.enabled_at_ns = 0;
        self.timers = Default::default();
    }

    fn enabled(&self) -> bool {
        self.config & CONFIG_ENABLE != 0
    }

    /// Counter ticks since the HPET was last enabled.
    fn elapsed(&self, now_ns: u64) -> u64 {
        ns_to_ticks(now_ns.saturating_sub(self.enabled_at_ns))
    }

    fn counter(&self, now_ns: u64) -> u64 {
        if self.enabled() {
            self.counter_base.wrapping_add(self.elapsed(now_ns))
        } else {
            self.counter_base
        }
    }

    /// The pin timer `index` interrupts now, if it is routed anywhere valid.
    fn pin(&self, index: usize) -> Option<u32> {
        if self.config & CONFIG_LEGACY_ROUTE != 0 {
            match index {
                0 => return Some(LEGACY_TIMER0_PIN),
                1 => return Some(LEGACY_TIMER1_PIN),
                _ => {}
            }
        }
        let route = self.timers[index].route();
        (HPET_ROUTE_CAP & (1 << route) != 0).then_some(route)
    }

    /// Computes when timer `index` next matches, from the counter at `now_ns`.
    fn schedule(&mut self, index: usize, now_ns: u64) {
        let elapsed = self.elapsed(now_ns);
        let counter = self.counter(now_ns);
        let timer = &mut self.timers[index];
        timer.fire_at = if self.config & CONFIG_ENABLE != 0 {
            timer
                .ticks_to_match(counter)
                .and_then(|ticks| elapsed.checked_add(ticks))
        } else {
            None
        };
    }

    /// Fires every comparator whose match time has passed, once each (late periods coalesce).
    fn advance(&mut self, now_ns: u64) {
        if !self.enabled() {
            return;
        }
        let elapsed = self.elapsed(now_ns);
        for index in 0..HPET_TIMERS {
            let timer = &mut self.timers[index];
            let Some(fire_at) = timer.fire_at.filter(|&at| at <= elapsed) else {
                continue;
            };
            let periodic = timer.config & TN_PERIODIC != 0;
            let period = timer.period & timer.width_mask();
            timer.fire_at = if periodic && period != 0 {
                // Never sooner than the minimum period (see MIN_PERIODIC_NS).
                let min = crate::intc::periods_at_least(period, MIN_PERIODIC_TICKS);
                let periods = ((elapsed - fire_at) / period + 1).max(min);
                let step = periods.wrapping_mul(period);
                timer.comparator = timer.comparator.wrapping_add(step) & timer.width_mask();
                fire_at.checked_add(step)
            } else if timer.is_32bit() {
                fire_at.checked_add(1 << 32)
            } else {
                None
            };
            self.fire(index);
        }
    }

    fn fire(&mut self, index: usize) {
        let timer = &self.timers[index];
        if timer.config & TN_INT_ENABLE == 0 {
            return;
        }
        if timer.config & TN_LEVEL != 0 {
            self.int_status |= 1 << index;
            self.sync_level_output(index);
        } else if let Some(pin) = self.pin(index) {
            self.sink.set_pin_level(pin, true);
            self.sink.set_pin_level(pin, false);
        }
    }

    /// Makes the pin timer `index` holds high match its status bit, config and route.
    fn sync_level_output(&mut self, index: usize) {
        let timer = &self.timers[index];
        let active = self.int_status & (1 << index) != 0
            && timer.config & TN_LEVEL != 0
            && timer.config & TN_INT_ENABLE != 0;
        let wanted = if active { self.pin(index) } else { None };
        let current = timer.asserted_pin;
        if wanted == current {
            return;
        }
        if let Some(pin) = current {
            self.sink.set_pin_level(pin, false);
        }
        if let Some(pin) = wanted {
            self.sink.set_pin_level(pin, true);
        }
        self.timers[index].asserted_pin = wanted;
    }

    /// Brings the model up to `now_ns` and delivers due interrupts.
    pub fn tick(&mut self, now_ns: u64) {
        self.advance(now_ns);
    }

    /// When the next enabled comparator interrupt is due, or None.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        if !self.enabled() {
            return None;
        }
        self.timers
            .iter()
            .filter(|t| t.config & TN_INT_ENABLE != 0)
            .filter_map(|t| t.fire_at)
            .min()
            .map(|ticks| self.enabled_at_ns.saturating_add(ticks_to_ns(ticks)))
    }

    /// Reads the 64-bit register at 8-byte-aligned `reg`.
    pub fn read_register(&mut self, reg: u64) -> u64 {
        let now = self.clock.now_ns();
        self.advance(now);
        match reg {
            REG_CAPABILITIES => CAPABILITIES,
            REG_CONFIG => self.config,
            REG_INT_STATUS => self.int_status,
            REG_MAIN_COUNTER => self.counter(now),
            _ => match Self::timer_register(reg) {
                Some((index, TIMER_CONFIG)) => {
                    u64::from(HPET_ROUTE_CAP) << 32
                        | TN_PERIODIC_CAP
                        | TN_64BIT_CAP
                        | self.timers[index].config
                }
                Some((index, TIMER_COMPARATOR)) => self.timers[index].comparator,
                _ => 0,
            },
        }
    }

    /// Writes the bits of `mask` in the 64-bit register at 8-byte-aligned `reg`.
    pub fn write_register(&mut self, reg: u64, value: u64, mask: u64) {
        let now = self.clock.now_ns();
        self.advance(now);
        let merge = |old: u64| (old & !mask) | (value & mask);
        match reg {
            REG_CONFIG => self.write_config(merge(self.config), now),
            REG_INT_STATUS => {
                let cleared = self.int_status & value & mask;
                self.int_status &= !cleared;
                for index in 0..HPET_TIMERS {
                    if cleared & (1 << index) != 0 {
                        self.sync_level_output(index);
                    }
                }
            }
            // The counter may only be set while halted.
            REG_MAIN_COUNTER if !self.enabled() => self.counter_base = merge(self.counter_base),
            _ => match Self::timer_register(reg) {
                Some((index, TIMER_CONFIG)) => {
                    let new = merge(self.timers[index].config);
                    self.write_timer_config(index, new, now);
                }
                Some((index, TIMER_COMPARATOR)) => self.write_comparator(index, value, mask, now),
                _ => {}
            },
        }
    }

    fn timer_register(reg: u64) -> Option<(usize, u64)> {
        let relative = reg.checked_sub(REG_TIMER_BASE)?;
        let index = usize::try_from(relative / TIMER_STRIDE).ok()?;
        (index < HPET_TIMERS).then_some((index, relative % TIMER_STRIDE))
    }

    fn write_config(&mut self, new: u64, now_ns: u64) {
        let new = new & (CONFIG_ENABLE | CONFIG_LEGACY_ROUTE);
        let was_enabled = self.enabled();
        if was_enabled && new & CONFIG_ENABLE == 0 {
            self.counter_base = self.counter(now_ns);
        }
        self.config = new;
        if !was_enabled && self.enabled() {
            self.enabled_at_ns = now_ns;
        }
        for index in 0..HPET_TIMERS {
            self.schedule(index, now_ns);
            self.sync_level_output(index);
        }
    }

    fn write_timer_config(&mut self, index: usize, new: u64, now_ns: u64) {
        let timer = &mut self.timers[index];
        let route_allowed = HPET_ROUTE_CAP & (1 << ((new & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT)) != 0;
        let route = if route_allowed {
            new & TN_ROUTE_MASK
        } else {
            timer.config & TN_ROUTE_MASK
        };
        timer.config = (new & TN_WRITABLE & !TN_ROUTE_MASK) | route;
        timer.comparator &= timer.width_mask();
        // A level interrupt ends when it is disabled or the timer turns edge-triggered.
        if timer.config & TN_INT_ENABLE == 0 || timer.config & TN_LEVEL == 0 {
            self.int_status &= !(1 << index);
        }
        self.schedule(index, now_ns);
        self.sync_level_output(index);
    }

    fn write_comparator(&mut self, index: usize, value: u64, mask: u64, now_ns: u64) {
        let timer = &mut self.timers[index];
        if timer.config & TN_PERIODIC != 0 {
            // In periodic mode a write sets the period; with VAL_SET also the comparator.
            timer.period = ((timer.period & !mask) | (value & mask)) & timer.width_mask();
            if timer.config & TN_VAL_SET != 0 {
                timer.comparator = timer.period;
            }
        } else {
            timer.comparator = ((timer.comparator & !mask) | (value & mask)) & timer.width_mask();
        }
        timer.config &= !TN_VAL_SET;
        self.schedule(index, now_ns);
    }
}

/// 4- and 8-byte naturally aligned accesses; others read as all ones and write nothing.
impl BusDevice for Hpet {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let len = data.len();
        if !matches!(len, 4 | 8) || offset % len as u64 != 0 || offset >= HPET_LEN {
            data.fill(0xff);
            return;
        }
        let shift = (offset & 4) * 8;
        let value = self.read_register(offset & !7) >> shift;
        data.copy_from_slice(&value.to_le_bytes()[..len]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let len = data.len();
        if !matches!(len, 4 | 8) || offset % len as u64 != 0 || offset >= HPET_LEN {
            return;
        }
        let mut bytes = [0u8; 8];
        bytes[..len].copy_from_slice(data);
        let shift = (offset & 4) * 8;
        let mask = if len == 8 {
            u64::MAX
        } else {
            u64::from(u32::MAX) << shift
        };
        self.write_register(offset & !7, u64::from_le_bytes(bytes) << shift, mask);
    }
}

impl crate::devices::PowerOnReset for Hpet {
    fn power_on_reset(&mut self) {
        Hpet::power_on_reset(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intc::clock::ManualClock;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Pins {
        events: Mutex<Vec<(u32, bool)>>,
    }

    impl Pins {
        fn take(&self) -> Vec<(u32, bool)> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    impl HpetIrqSink for Pins {
        fn set_pin_level(&self, pin: u32, high: bool) {
            self.events.lock().unwrap().push((pin, high));
        }
    }

    const START_NS: u64 = 7_000;

    fn hpet() -> (Arc<ManualClock>, Arc<Pins>, Hpet) {
        let clock = Arc::new(ManualClock::new(START_NS));
        let pins = Arc::new(Pins::default());
        let hpet = Hpet::new(clock.clone(), pins.clone());
        (clock, pins, hpet)
    }

    fn timer_reg(index: u64, reg: u64) -> u64 {
        REG_TIMER_BASE + index * TIMER_STRIDE + reg
    }

    fn write64(hpet: &mut Hpet, reg: u64, value: u64) {
        BusDevice::write(hpet, HPET_BASE, reg, &value.to_le_bytes());
    }

    fn read64(hpet: &mut Hpet, reg: u64) -> u64 {
        let mut bytes = [0u8; 8];
        BusDevice::read(hpet, HPET_BASE, reg, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    fn read32(hpet: &mut Hpet, offset: u64) -> u32 {
        let mut bytes = [0u8; 4];
        BusDevice::read(hpet, HPET_BASE, offset, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn write32(hpet: &mut Hpet, offset: u64, value: u32) {
        BusDevice::write(hpet, HPET_BASE, offset, &value.to_le_bytes());
    }

    /// Timer `index` routed to pin 20 with the given extra config bits.
    fn route_to_20(hpet: &mut Hpet, index: u64, bits: u64) {
        write64(hpet, timer_reg(index, TIMER_CONFIG), 20 << 9 | bits);
    }

    #[test]
    fn capabilities_describe_three_64bit_timers_at_16_mhz() {
        let (_clock, _pins, mut hpet) = hpet();
        assert_eq!(read32(&mut hpet, 0x0), 0x8086_a201);
        assert_eq!(read32(&mut hpet, 0x4), 59_604_644);
        let config = read64(&mut hpet, timer_reg(2, TIMER_CONFIG));
        assert_eq!(config >> 32, 0x00f0_0000);
        assert_eq!(config & 0x30, 0x30, "periodic and 64-bit capable");
        assert_eq!(config & (1 << 15), 0, "no FSB delivery");
    }

    #[test]
    fn the_counter_runs_only_while_enabled() {
        let (clock, _pins, mut hpet) = hpet();
        clock.advance(1_000_000_000);
        assert_eq!(read64(&mut hpet, REG_MAIN_COUNTER), 0);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(1_000_000_000);
        assert_eq!(read64(&mut hpet, REG_MAIN_COUNTER), HPET_HZ);
        write64(&mut hpet, REG_CONFIG, 0);
        clock.advance(1_000_000_000);
        assert_eq!(read64(&mut hpet, REG_MAIN_COUNTER), HPET_HZ);
        // Writable while halted, and it resumes from there.
        write64(&mut hpet, REG_MAIN_COUNTER, 100);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(500_000_000);
        assert_eq!(read64(&mut hpet, REG_MAIN_COUNTER), 100 + HPET_HZ / 2);
        // Not writable while running.
        write64(&mut hpet, REG_MAIN_COUNTER, 5);
        assert_eq!(read64(&mut hpet, REG_MAIN_COUNTER), 100 + HPET_HZ / 2);
    }

    #[test]
    fn a_one_shot_edge_timer_pulses_its_pin_once() {
        let (clock, pins, mut hpet) = hpet();
        route_to_20(&mut hpet, 0, TN_INT_ENABLE);
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 1000);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        let deadline = hpet.next_deadline_ns().unwrap();
        assert_eq!(deadline, START_NS + ticks_to_ns(1000));
        clock.set(deadline - 1);
        hpet.tick(clock.now_ns());
        assert!(pins.take().is_empty());
        clock.set(deadline);
        hpet.tick(clock.now_ns());
        assert_eq!(pins.take(), vec![(20, true), (20, false)]);
        assert_eq!(hpet.next_deadline_ns(), None, "64-bit one-shot");
        clock.advance(10_000_000_000);
        hpet.tick(clock.now_ns());
        assert!(pins.take().is_empty());
        assert_eq!(
            read64(&mut hpet, REG_INT_STATUS),
            0,
            "edge mode sets no status"
        );
    }

    #[test]
    fn a_32bit_one_shot_fires_again_after_the_counter_wraps() {
        let (clock, pins, mut hpet) = hpet();
        route_to_20(&mut hpet, 1, TN_INT_ENABLE | TN_32BIT_MODE);
        write64(&mut hpet, timer_reg(1, TIMER_COMPARATOR), 0x1_0000_0010);
        assert_eq!(read64(&mut hpet, timer_reg(1, TIMER_COMPARATOR)), 0x10);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.set(START_NS + ticks_to_ns(0x10));
        hpet.tick(clock.now_ns());
        assert_eq!(pins.take().len(), 2);
        assert_eq!(
            hpet.next_deadline_ns(),
            Some(START_NS + ticks_to_ns(0x1_0000_0010))
        );
    }

    #[test]
    fn a_periodic_timer_uses_val_set_as_linux_programs_it() {
        let (clock, pins, mut hpet) = hpet();
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        route_to_20(&mut hpet, 0, TN_INT_ENABLE | TN_PERIODIC | TN_VAL_SET);
        let now = read64(&mut hpet, REG_MAIN_COUNTER);
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), now + 5000);
        assert_eq!(
            read64(&mut hpet, timer_reg(0, TIMER_CONFIG)) & TN_VAL_SET,
            0,
            "VAL_SET clears itself"
        );
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 10000);
        assert_eq!(read64(&mut hpet, timer_reg(0, TIMER_COMPARATOR)), 5000);
        clock.set(START_NS + ticks_to_ns(5000));
        hpet.tick(clock.now_ns());
        assert_eq!(pins.take(), vec![(20, true), (20, false)]);
        assert_eq!(read64(&mut hpet, timer_reg(0, TIMER_COMPARATOR)), 15000);
        assert_eq!(hpet.next_deadline_ns(), Some(START_NS + ticks_to_ns(15000)));
        // Three periods late: one interrupt, and the comparator moves past the counter.
        clock.set(START_NS + ticks_to_ns(46000));
        hpet.tick(clock.now_ns());
        assert_eq!(pins.take().len(), 2);
        assert_eq!(read64(&mut hpet, timer_reg(0, TIMER_COMPARATOR)), 55000);
    }

    /// A 1-tick (60 ns) period would wake the timer thread without end: periodic timers
    /// fire at most every MIN_PERIODIC_NS.
    #[test]
    fn a_periodic_timer_has_a_minimum_period() {
        let (clock, _pins, mut hpet) = hpet();
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        route_to_20(&mut hpet, 0, TN_INT_ENABLE | TN_PERIODIC | TN_VAL_SET);
        let now = read64(&mut hpet, REG_MAIN_COUNTER);
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), now + 1);
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 1);
        let first = hpet.next_deadline_ns().unwrap();
        clock.set(first);
        hpet.tick(first);
        let next = hpet.next_deadline_ns().unwrap();
        assert!(
            next - first >= crate::intc::MIN_PERIODIC_NS,
            "next tick after {} ns",
            next - first
        );
    }

    #[test]
    fn a_level_timer_holds_its_pin_until_status_is_cleared() {
        let (clock, pins, mut hpet) = hpet();
        route_to_20(&mut hpet, 2, TN_INT_ENABLE | TN_LEVEL);
        write64(&mut hpet, timer_reg(2, TIMER_COMPARATOR), 100);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(ticks_to_ns(100));
        hpet.tick(clock.now_ns());
        assert_eq!(pins.take(), vec![(20, true)]);
        assert_eq!(read64(&mut hpet, REG_INT_STATUS), 0b100);
        // Writing 0 changes nothing; writing 1 clears and deasserts.
        write64(&mut hpet, REG_INT_STATUS, 0b011);
        assert_eq!(read64(&mut hpet, REG_INT_STATUS), 0b100);
        assert!(pins.take().is_empty());
        write32(&mut hpet, REG_INT_STATUS, 0b100);
        assert_eq!(read64(&mut hpet, REG_INT_STATUS), 0);
        assert_eq!(pins.take(), vec![(20, false)]);
    }

    #[test]
    fn a_machine_reset_halts_it_and_drops_an_asserted_line() {
        let (clock, pins, mut hpet) = hpet();
        let fresh: Vec<u64> = [REG_CONFIG, REG_INT_STATUS, timer_reg(2, TIMER_CONFIG)]
            .iter()
            .map(|&r| read64(&mut hpet, r))
            .collect();
        route_to_20(&mut hpet, 2, TN_INT_ENABLE | TN_LEVEL);
        write64(&mut hpet, timer_reg(2, TIMER_COMPARATOR), 100);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(ticks_to_ns(100));
        hpet.tick(clock.now_ns());
        assert_eq!(pins.take(), vec![(20, true)]);
        hpet.power_on_reset();
        assert_eq!(pins.take(), vec![(20, false)], "the level line drops");
        let after: Vec<u64> = [REG_CONFIG, REG_INT_STATUS, timer_reg(2, TIMER_CONFIG)]
            .iter()
            .map(|&r| read64(&mut hpet, r))
            .collect();
        assert_eq!(after, fresh);
        assert_eq!(read64(&mut hpet, REG_MAIN_COUNTER), 0);
        assert_eq!(hpet.next_deadline_ns(), None, "no timer armed");
    }

    #[test]
    fn disabling_a_level_interrupt_drops_the_line() {
        let (clock, pins, mut hpet) = hpet();
        route_to_20(&mut hpet, 0, TN_INT_ENABLE | TN_LEVEL);
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 10);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(ticks_to_ns(10));
        hpet.tick(clock.now_ns());
        assert_eq!(pins.take(), vec![(20, true)]);
        route_to_20(&mut hpet, 0, TN_LEVEL);
        assert_eq!(pins.take(), vec![(20, false)]);
        assert_eq!(read64(&mut hpet, REG_INT_STATUS), 0);
    }

    #[test]
    fn a_disabled_timer_interrupts_nobody() {
        let (clock, pins, mut hpet) = hpet();
        route_to_20(&mut hpet, 0, TN_LEVEL);
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 10);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        assert_eq!(hpet.next_deadline_ns(), None);
        clock.advance(1_000_000);
        hpet.tick(clock.now_ns());
        assert!(pins.take().is_empty());
        assert_eq!(read64(&mut hpet, REG_INT_STATUS), 0);
    }

    #[test]
    fn routes_outside_the_capability_are_refused() {
        let (clock, pins, mut hpet) = hpet();
        write64(
            &mut hpet,
            timer_reg(0, TIMER_CONFIG),
            5 << 9 | TN_INT_ENABLE,
        );
        assert_eq!(
            read64(&mut hpet, timer_reg(0, TIMER_CONFIG)) & TN_ROUTE_MASK,
            0
        );
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 10);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(ticks_to_ns(10));
        hpet.tick(clock.now_ns());
        assert!(pins.take().is_empty(), "unrouted");
        write64(
            &mut hpet,
            timer_reg(0, TIMER_CONFIG),
            23 << 9 | TN_INT_ENABLE,
        );
        assert_eq!(
            read64(&mut hpet, timer_reg(0, TIMER_CONFIG)) & TN_ROUTE_MASK,
            23 << 9
        );
    }

    #[test]
    fn legacy_replacement_routes_timers_0_and_1_to_irq_0_and_8() {
        let (clock, pins, mut hpet) = hpet();
        route_to_20(&mut hpet, 0, TN_INT_ENABLE);
        route_to_20(&mut hpet, 1, TN_INT_ENABLE);
        route_to_20(&mut hpet, 2, TN_INT_ENABLE);
        for index in 0..3 {
            write64(&mut hpet, timer_reg(index, TIMER_COMPARATOR), 10);
        }
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE | CONFIG_LEGACY_ROUTE);
        clock.advance(ticks_to_ns(10));
        hpet.tick(clock.now_ns());
        assert_eq!(
            pins.take(),
            vec![
                (2, true),
                (2, false),
                (8, true),
                (8, false),
                (20, true),
                (20, false)
            ]
        );
    }

    #[test]
    fn turning_legacy_routing_on_moves_an_asserted_level_line() {
        let (clock, pins, mut hpet) = hpet();
        route_to_20(&mut hpet, 1, TN_INT_ENABLE | TN_LEVEL);
        write64(&mut hpet, timer_reg(1, TIMER_COMPARATOR), 10);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(ticks_to_ns(10));
        hpet.tick(clock.now_ns());
        assert_eq!(pins.take(), vec![(20, true)]);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE | CONFIG_LEGACY_ROUTE);
        assert_eq!(pins.take(), vec![(20, false), (8, true)]);
    }

    #[test]
    fn halting_stops_interrupts_and_enabling_resumes_them() {
        let (clock, pins, mut hpet) = hpet();
        route_to_20(&mut hpet, 0, TN_INT_ENABLE);
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 1000);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(ticks_to_ns(600));
        write64(&mut hpet, REG_CONFIG, 0);
        assert_eq!(hpet.next_deadline_ns(), None);
        clock.advance(1_000_000_000);
        hpet.tick(clock.now_ns());
        assert!(pins.take().is_empty());
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        let resumed = clock.now_ns();
        assert_eq!(hpet.next_deadline_ns(), Some(resumed + ticks_to_ns(400)));
    }

    #[test]
    fn thirty_two_bit_halves_access_the_64bit_registers() {
        let (clock, _pins, mut hpet) = hpet();
        write32(&mut hpet, timer_reg(0, TIMER_COMPARATOR) + 4, 0x1);
        write32(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 0x2345_6789);
        assert_eq!(
            read64(&mut hpet, timer_reg(0, TIMER_COMPARATOR)),
            0x1_2345_6789
        );
        write32(&mut hpet, REG_MAIN_COUNTER + 4, 0xabcd);
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        clock.advance(1_000);
        assert_eq!(read32(&mut hpet, REG_MAIN_COUNTER + 4), 0xabcd);
        assert_eq!(
            read32(&mut hpet, REG_MAIN_COUNTER),
            ns_to_ticks(1_000) as u32
        );
    }

    #[test]
    fn bad_accesses_are_refused() {
        let (_clock, _pins, mut hpet) = hpet();
        let mut two = [0u8; 2];
        BusDevice::read(&mut hpet, HPET_BASE, 0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        let mut four = [0u8; 4];
        BusDevice::read(&mut hpet, HPET_BASE, 2, &mut four);
        assert_eq!(four, [0xff; 4]);
        BusDevice::read(&mut hpet, HPET_BASE, HPET_LEN, &mut four);
        assert_eq!(four, [0xff; 4]);
        // A misaligned write does not enable the counter.
        BusDevice::write(&mut hpet, HPET_BASE, REG_CONFIG + 2, &[1, 0, 0, 0]);
        assert_eq!(read64(&mut hpet, REG_CONFIG), 0);
        // Registers past the third timer read 0 and ignore writes.
        write64(&mut hpet, timer_reg(3, TIMER_CONFIG), u64::MAX);
        assert_eq!(read64(&mut hpet, timer_reg(3, TIMER_CONFIG)), 0);
        write64(&mut hpet, REG_CAPABILITIES, 0);
        assert_eq!(read32(&mut hpet, 0), 0x8086_a201);
    }

    #[test]
    fn the_comparator_write_while_running_schedules_from_the_current_counter() {
        let (clock, pins, mut hpet) = hpet();
        write64(&mut hpet, REG_CONFIG, CONFIG_ENABLE);
        route_to_20(&mut hpet, 0, TN_INT_ENABLE);
        clock.advance(ticks_to_ns(5000));
        // Already passed in a 64-bit timer: it never matches.
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 10);
        assert_eq!(hpet.next_deadline_ns(), None);
        write64(&mut hpet, timer_reg(0, TIMER_COMPARATOR), 6000);
        assert_eq!(hpet.next_deadline_ns(), Some(START_NS + ticks_to_ns(6000)));
        clock.set(START_NS + ticks_to_ns(6000));
        // A register read delivers what is due, even before the owner's tick.
        let _ = read64(&mut hpet, REG_MAIN_COUNTER);
        assert_eq!(pins.take().len(), 2);
    }
}
