//! Intel 8254 programmable interval timer (ports 0x40-0x43) and the PC's port 0x61, which
//! gates channel 2 (the speaker channel) and reports its output.
//!
//! Counters are not stepped: each channel remembers when it started counting, and its counter
//! value and OUT pin are computed from the injected clock when read. Channel 0 drives ISA
//! IRQ 0; `tick` returns how many rising edges of its OUT happened since the previous call
//! and `next_deadline_ns` says when the next one is due, so the owner arms one host timer and
//! pulses IRQ 0 (coalescing, as a late interrupt on real hardware would).
//!
//! Binary counting only: the BCD bit is kept and reported in the status byte, but counts are
//! treated as binary.

use std::sync::Arc;

use super::clock::Clock;
use crate::devices::bus::{read_byte_ports, write_byte_ports, BusDevice, BytePorts};

/// The 8254 input clock on a PC, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// Channel 0 data port; channels 1 and 2 follow, then the control word port.
pub const PIT_PORT: u16 = 0x40;
pub const PIT_CONTROL_PORT: u16 = 0x43;
/// NMI status and control: channel 2 gate, speaker enable, refresh toggle, OUT2.
pub const SPEAKER_PORT: u16 = 0x61;

const NS_PER_SEC: u128 = 1_000_000_000;
/// The DRAM refresh request a PC toggles in port 0x61 bit 4, every 15.085 us.
const REFRESH_PERIOD_NS: u64 = 15_085;

const PORT61_GATE2: u8 = 0x01;
const PORT61_SPEAKER_DATA: u8 = 0x02;
const PORT61_WRITABLE: u8 = 0x0f;
const PORT61_REFRESH: u8 = 0x10;
const PORT61_OUT2: u8 = 0x20;

const STATUS_OUT: u8 = 0x80;
const STATUS_NULL_COUNT: u8 = 0x40;
const READ_BACK_NO_COUNT: u8 = 0x20;
const READ_BACK_NO_STATUS: u8 = 0x10;

/// Which bytes of the 16-bit count a data port access moves (control word bits 5-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Low,
    High,
    LowThenHigh,
}

impl Access {
    fn from_bits(bits: u8) -> Self {
        match bits & 3 {
            1 => Access::Low,
            2 => Access::High,
            _ => Access::LowThenHigh,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Access::Low => 1,
            Access::High => 2,
            Access::LowThenHigh => 3,
        }
    }
}

#[derive(Debug, Clone)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    /// The count as loaded, 1-65536 (a written 0 means 65536).
    reload: u64,
    /// A count has been written since the last control word.
    loaded: bool,
    /// Modes 1 and 5 count only after a gate rising edge; the others once loaded.
    triggered: bool,
    gate: bool,
    /// When the current stretch of counting began; None while stopped.
    run_start_ns: Option<u64>,
    /// Ticks counted before `run_start_ns` (mode 0 and 4 pause while the gate is low).
    ticks_before_run: u64,
    /// The low byte of a low-then-high count write, waiting for its high byte.
    pending_low: Option<u8>,
    /// Low-then-high reads of the live counter: the next read returns the high byte.
    read_high_next: bool,
    latched_count: [u8; 2],
    latched_count_len: usize,
    latched_count_pos: usize,
    latched_status: Option<u8>,
    /// OUT rising edges already reported by `tick` since the count was loaded.
    edges_reported: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Self {
            mode: 0,
            access: Access::LowThenHigh,
            bcd: false,
            reload: 0x1_0000,
            loaded: false,
            triggered: false,
            gate,
            run_start_ns: None,
            ticks_before_run: 0,
            pending_low: None,
            read_high_next: false,
            latched_count: [0; 2],
            latched_count_len: 0,
            latched_count_pos: 0,
            latched_status: None,
            edges_reported: 0,
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    fn needs_trigger(&self) -> bool {
        matches!(self.mode, 1 | 5)
    }

    /// Ticks counted since the count was loaded (or triggered), or None before that.
    fn elapsed(&self, now_ns: u64) -> Option<u64> {
        if !self.loaded || !self.triggered {
            return None;
        }
        let running = self
            .run_start_ns
            .map_or(0, |start| ns_to_ticks(now_ns.saturating_sub(start)));
        Some(self.ticks_before_run.saturating_add(running))
    }

    fn counter(&self, now_ns: u64) -> u16 {
        let Some(elapsed) = self.elapsed(now_ns) else {
            return self.reload as u16;
        };
        let n = self.reload;
        let value = match self.mode {
            2 => n - elapsed % n,
            3 => {
                let phase = elapsed % n;
                let high_half = n.div_ceil(2);
                let into_half = if phase < high_half {
                    phase
                } else {
                    phase - high_half
                };
                (n - 2 * into_half) & !1
            }
            // One-shot modes keep counting down through 0 and wrap.
            _ => n.wrapping_sub(elapsed),
        };
        value as u16
    }

    fn out(&self, now_ns: u64) -> bool {
        if !self.loaded {
            // A control word drives OUT low in mode 0 and high in the others.
            return self.mode != 0;
        }
        if self.periodic() && !self.gate {
            return true;
        }
        let Some(elapsed) = self.elapsed(now_ns) else {
            return true;
        };
        let n = self.reload;
        match self.mode {
            0 | 1 => elapsed >= n,
            2 => elapsed % n != n - 1,
            3 => elapsed % n < n.div_ceil(2),
            _ => elapsed != n,
        }
    }

    /// OUT rising edges from load to `elapsed` ticks.
    fn edges_until(&self, elapsed: u64) -> u64 {
        let n = self.reload;
        match self.mode {
            0 | 1 => u64::from(elapsed >= n),
            2 | 3 => elapsed / n,
            _ => u64::from(elapsed > n),
        }
    }

    /// The elapsed tick count at which rising edge number `edge` (1-based) happens.
    fn edge_at(&self, edge: u64) -> Option<u64> {
        let n = self.reload;
        match self.mode {
            0 | 1 => (edge == 1).then_some(n),
            2 | 3 => edge.checked_mul(n),
            _ => (edge == 1).then_some(n + 1),
        }
    }

    fn write_control(&mut self, value: u8) {
        self.access = Access::from_bits(value >> 4);
        // Modes 6 and 7 are aliases of 2 and 3.
        self.mode = match (value >> 1) & 7 {
            6 => 2,
            7 => 3,
            mode => mode,
        };
        self.bcd = value & 1 != 0;
        self.loaded = false;
        self.triggered = false;
        self.run_start_ns = None;
        self.ticks_before_run = 0;
        self.pending_low = None;
        self.read_high_next = false;
        self.latched_count_len = 0;
        self.latched_status = None;
        self.edges_reported = 0;
    }

    fn write_count(&mut self, value: u8, now_ns: u64) {
        let count = match self.access {
            Access::Low => u16::from(value),
            Access::High => u16::from(value) << 8,
            Access::LowThenHigh => match self.pending_low.take() {
                Some(low) => u16::from_le_bytes([low, value]),
                None => {
                    self.pending_low = Some(value);
                    if self.mode == 0 {
                        // Writing the first byte stops a mode 0 count (and drops OUT).
                        self.loaded = false;
                    }
                    return;
                }
            },
        };
        self.load(count, now_ns);
    }

    fn load(&mut self, count: u16, now_ns: u64) {
        self.reload = if count == 0 {
            0x1_0000
        } else {
            u64::from(count)
        };
        self.loaded = true;
        self.triggered = !self.needs_trigger();
        self.ticks_before_run = 0;
        self.run_start_ns = self.gate.then_some(now_ns);
        self.edges_reported = 0;
    }

    fn set_gate(&mut self, high: bool, now_ns: u64) {
        if high == self.gate {
            return;
        }
        self.gate = high;
        if high {
            // Modes 1, 2, 3 and 5 (re)start from the full count on a rising gate.
            if self.loaded && matches!(self.mode, 1 | 2 | 3 | 5) {
                self.triggered = true;
                self.ticks_before_run = 0;
                self.edges_reported = 0;
            }
            self.run_start_ns = Some(now_ns);
        } else if !self.needs_trigger() {
            // Modes 0 and 4 pause; modes 2 and 3 stop until the next rising edge.
            if let Some(elapsed) = self.elapsed(now_ns) {
                self.ticks_before_run = elapsed;
            }
            self.run_start_ns = None;
        }
    }

    fn latch_count(&mut self, now_ns: u64) {
        if self.latched_count_len != 0 {
            return;
        }
        let [low, high] = self.counter(now_ns).to_le_bytes();
        (self.latched_count, self.latched_count_len) = match self.access {
            Access::Low => ([low, 0], 1),
            Access::High => ([high, 0], 1),
            Access::LowThenHigh => ([low, high], 2),
        };
        self.latched_count_pos = 0;
    }

    fn latch_status(&mut self, now_ns: u64) {
        if self.latched_status.is_some() {
            return;
        }
        let mut status = self.access.bits() << 4 | self.mode << 1 | u8::from(self.bcd);
        if self.out(now_ns) {
            status |= STATUS_OUT;
        }
        if !self.loaded {
            status |= STATUS_NULL_COUNT;
        }
        self.latched_status = Some(status);
    }

    fn read(&mut self, now_ns: u64) -> u8 {
        if let Some(status) = self.latched_status.take() {
            return status;
        }
        if self.latched_count_pos < self.latched_count_len {
            let byte = self.latched_count[self.latched_count_pos];
            self.latched_count_pos += 1;
            if self.latched_count_pos == self.latched_count_len {
                self.latched_count_len = 0;
            }
            return byte;
        }
        let [low, high] = self.counter(now_ns).to_le_bytes();
        match self.access {
            Access::Low => low,
            Access::High => high,
            Access::LowThenHigh => {
                self.read_high_next = !self.read_high_next;
                if self.read_high_next {
                    low
                } else {
                    high
                }
            }
        }
    }
}

fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / NS_PER_SEC) as u64
}

/// The shortest time after which `ns_to_ticks` reaches `ticks`.
fn ticks_to_ns(ticks: u64) -> u64 {
    let ns = (u128::from(ticks) * NS_PER_SEC).div_ceil(u128::from(PIT_HZ));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

pub struct Pit {
    clock: Arc<dyn Clock>,
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as last written.
    port61: u8,
}

impl Pit {
    /// All channels unprogrammed; the channel 0 and 1 gates are wired high, channel 2's is
    /// port 0x61 bit 0 (low at reset).
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port61: 0,
        }
    }

    /// Power-on: every channel unprogrammed, port 0x61 clear.
    pub fn power_on_reset(&mut self) {
        self.channels = [Channel::new(true), Channel::new(true), Channel::new(false)];
        self.port61 = 0;
    }

    /// Reports channel 0 OUT rising edges (IRQ 0 requests) since the previous call. More than
    /// one means the caller was late; a PC would have delivered only one.
    pub fn tick(&mut self, now_ns: u64) -> u32 {
        let channel = &mut self.channels[0];
        let Some(elapsed) = channel.elapsed(now_ns) else {
            return 0;
        };
        let total = channel.edges_until(elapsed);
        let new = total.saturating_sub(channel.edges_reported);
        channel.edges_reported = channel.edges_reported.max(total);
        u32::try_from(new).unwrap_or(u32::MAX)
    }

    /// When channel 0's next IRQ 0 edge is due, or None if it will not raise one.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let channel = &self.channels[0];
        if !channel.loaded || !channel.triggered {
            return None;
        }
        let start = channel.run_start_ns?;
        // Periodic modes: never sooner than the minimum period (see MIN_PERIODIC_NS); the
        // edges in between are counted and coalesce into this one.
        let step = if channel.periodic() {
            // Rounded up, so the gap is never below the minimum.
            let min_ticks = ns_to_ticks(crate::intc::MIN_PERIODIC_NS) + 1;
            crate::intc::periods_at_least(channel.reload, min_ticks)
        } else {
            1
        };
        let at = channel.edge_at(channel.edges_reported + step)?;
        let remaining = at.saturating_sub(channel.ticks_before_run);
        Some(start.saturating_add(ticks_to_ns(remaining)))
    }

    /// Channel `index`'s OUT pin now (false for an index past 2).
    pub fn out(&self, index: usize) -> bool {
        let now = self.clock.now_ns();
        self.channels.get(index).is_some_and(|c| c.out(now))
    }

    fn write_control(&mut self, value: u8, now_ns: u64) {
        let select = value >> 6;
        if select == 3 {
            self.read_back(value, now_ns);
            return;
        }
        let channel = &mut self.channels[usize::from(select)];
        if (value >> 4) & 3 == 0 {
            channel.latch_count(now_ns);
        } else {
            channel.write_control(value);
        }
    }

    fn read_back(&mut self, value: u8, now_ns: u64) {
        for (index, channel) in self.channels.iter_mut().enumerate() {
            if value & (2 << index) == 0 {
                continue;
            }
            if value & READ_BACK_NO_STATUS == 0 {
                channel.latch_status(now_ns);
            }
            if value & READ_BACK_NO_COUNT == 0 {
                channel.latch_count(now_ns);
            }
        }
    }

    fn read_port61(&self, now_ns: u64) -> u8 {
        let mut value = self.port61;
        if (now_ns / REFRESH_PERIOD_NS) & 1 != 0 {
            value |= PORT61_REFRESH;
        }
        if self.channels[2].out(now_ns) {
            value |= PORT61_OUT2;
        }
        value
    }

    fn write_port61(&mut self, value: u8, now_ns: u64) {
        self.port61 = value & PORT61_WRITABLE;
        self.channels[2].set_gate(value & PORT61_GATE2 != 0, now_ns);
    }

    /// Whether the speaker is sounding channel 2's output (port 0x61 bits 0 and 1).
    pub fn speaker_enabled(&self) -> bool {
        self.port61 & (PORT61_GATE2 | PORT61_SPEAKER_DATA) == PORT61_GATE2 | PORT61_SPEAKER_DATA
    }

    /// A guest port read. The control port and unknown ports read 0xff.
    pub fn read_port(&mut self, port: u16) -> u8 {
        let now = self.clock.now_ns();
        match port {
            0x40..=0x42 => self.channels[usize::from(port - PIT_PORT)].read(now),
            SPEAKER_PORT => self.read_port61(now),
            _ => 0xff,
        }
    }

    /// A guest port write. Unknown ports are ignored.
    pub fn write_port(&mut self, port: u16, value: u8) {
        let now = self.clock.now_ns();
        match port {
            0x40..=0x42 => self.channels[usize::from(port - PIT_PORT)].write_count(value, now),
            PIT_CONTROL_PORT => self.write_control(value, now),
            SPEAKER_PORT => self.write_port61(value, now),
            _ => {}
        }
    }
}

impl BytePorts for Pit {
    fn read_port(&mut self, port: u16) -> u8 {
        Pit::read_port(self, port)
    }

    fn write_port(&mut self, port: u16, value: u8) {
        Pit::write_port(self, port, value)
    }
}

/// Serves 0x40-0x43 and 0x61; a wider access covers the following ports.
impl BusDevice for Pit {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        read_byte_ports(self, base, offset, data);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        write_byte_ports(self, base, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intc::clock::ManualClock;

    const START_NS: u64 = 1_000_000;

    fn pit() -> (Arc<ManualClock>, Pit) {
        let clock = Arc::new(ManualClock::new(START_NS));
        let pit = Pit::new(clock.clone());
        (clock, pit)
    }

    /// Programs `channel` in `mode` with a low-then-high count.
    fn program(pit: &mut Pit, channel: u8, mode: u8, count: u16) {
        pit.write_port(0x43, channel << 6 | 0x30 | mode << 1);
        let [low, high] = count.to_le_bytes();
        pit.write_port(0x40 + u16::from(channel), low);
        pit.write_port(0x40 + u16::from(channel), high);
    }

    fn latched_count(pit: &mut Pit, channel: u8) -> u16 {
        pit.write_port(0x43, channel << 6);
        let port = 0x40 + u16::from(channel);
        u16::from_le_bytes([pit.read_port(port), pit.read_port(port)])
    }

    fn read_status(pit: &mut Pit, channel: u8) -> u8 {
        pit.write_port(0x43, 0xe0 | 2 << channel);
        pit.read_port(0x40 + u16::from(channel))
    }

    #[test]
    fn mode_0_counts_down_and_raises_one_edge_at_terminal_count() {
        let (clock, mut pit) = pit();
        program(&mut pit, 0, 0, 1000);
        assert!(!pit.out(0));
        assert_eq!(latched_count(&mut pit, 0), 1000);
        // 1000 ticks at 1.193182 MHz is 838.095 us.
        let deadline = pit.next_deadline_ns().unwrap();
        assert_eq!(deadline, START_NS + 838_096);
        clock.set(deadline - 1);
        assert_eq!(pit.tick(clock.now_ns()), 0);
        assert_eq!(latched_count(&mut pit, 0), 1);
        clock.set(deadline);
        assert_eq!(pit.tick(clock.now_ns()), 1);
        assert!(pit.out(0));
        assert_eq!(pit.next_deadline_ns(), None);
        clock.advance(1_000_000_000);
        assert_eq!(pit.tick(clock.now_ns()), 0, "one-shot");
        assert!(pit.out(0), "OUT stays high until reprogrammed");
    }

    #[test]
    fn mode_0_counter_wraps_past_zero() {
        let (clock, mut pit) = pit();
        program(&mut pit, 0, 0, 10);
        clock.advance(ticks_to_ns(12));
        assert_eq!(latched_count(&mut pit, 0), 0xfffe);
    }

    #[test]
    fn mode_2_raises_an_edge_every_period() {
        let (clock, mut pit) = pit();
        // Linux's 100 Hz tick: 11932 ticks.
        program(&mut pit, 0, 2, 11932);
        assert!(pit.out(0));
        let first = pit.next_deadline_ns().unwrap();
        assert_eq!(first, START_NS + ticks_to_ns(11932));
        clock.set(first);
        assert_eq!(pit.tick(clock.now_ns()), 1);
        assert_eq!(
            pit.next_deadline_ns(),
            Some(START_NS + ticks_to_ns(2 * 11932))
        );
        // Late by three periods: the edges are counted, once.
        clock.set(START_NS + ticks_to_ns(5 * 11932) + 10);
        assert_eq!(pit.tick(clock.now_ns()), 4);
        assert_eq!(pit.tick(clock.now_ns()), 0);
    }

    /// A reload of 2 (1.7 us) would wake the timer thread without end: the IRQ 0 edges of a
    /// periodic mode are delivered at most every MIN_PERIODIC_NS (the counter stays exact).
    #[test]
    fn periodic_modes_have_a_minimum_interrupt_period() {
        for mode in [2, 3] {
            let (clock, mut pit) = pit();
            program(&mut pit, 0, mode, 2);
            let first = pit.next_deadline_ns().unwrap();
            clock.set(first);
            // The edges since the load, counted and delivered as one.
            assert!(pit.tick(clock.now_ns()) >= 1);
            let next = pit.next_deadline_ns().unwrap();
            assert!(
                next - first >= crate::intc::MIN_PERIODIC_NS,
                "mode {mode}: next tick after {} ns",
                next - first
            );
        }
    }

    #[test]
    fn mode_2_counter_reloads_and_out_pulses_low_at_one() {
        let (clock, mut pit) = pit();
        program(&mut pit, 0, 2, 100);
        clock.advance(ticks_to_ns(99));
        assert_eq!(latched_count(&mut pit, 0), 1);
        assert!(!pit.out(0));
        clock.set(START_NS + ticks_to_ns(100));
        assert_eq!(latched_count(&mut pit, 0), 100);
        assert!(pit.out(0));
        clock.set(START_NS + ticks_to_ns(130));
        assert_eq!(latched_count(&mut pit, 0), 70);
    }

    #[test]
    fn mode_3_is_a_square_wave_counting_by_two() {
        let (clock, mut pit) = pit();
        program(&mut pit, 0, 3, 100);
        assert!(pit.out(0));
        clock.advance(ticks_to_ns(10));
        assert_eq!(latched_count(&mut pit, 0), 80);
        clock.set(START_NS + ticks_to_ns(49));
        assert!(pit.out(0));
        clock.set(START_NS + ticks_to_ns(50));
        assert!(!pit.out(0), "second half of the period is low");
        assert_eq!(latched_count(&mut pit, 0), 100);
        clock.set(START_NS + ticks_to_ns(100));
        assert!(pit.out(0));
        assert_eq!(pit.tick(clock.now_ns()), 1);
    }

    #[test]
    fn a_zero_count_means_65536() {
        let (clock, mut pit) = pit();
        program(&mut pit, 0, 2, 0);
        assert_eq!(pit.next_deadline_ns(), Some(START_NS + ticks_to_ns(65536)));
        clock.advance(ticks_to_ns(1));
        assert_eq!(latched_count(&mut pit, 0), 65535);
    }

    #[test]
    fn latch_freezes_the_value_until_both_bytes_are_read() {
        let (clock, mut pit) = pit();
        program(&mut pit, 0, 2, 1000);
        clock.advance(ticks_to_ns(100));
        pit.write_port(0x43, 0x00);
        clock.advance(ticks_to_ns(300));
        // A second latch before reading is ignored.
        pit.write_port(0x43, 0x00);
        assert_eq!(pit.read_port(0x40), (900u16 & 0xff) as u8);
        assert_eq!(pit.read_port(0x40), (900u16 >> 8) as u8);
        // Afterwards reads are live again.
        let live = u16::from_le_bytes([pit.read_port(0x40), pit.read_port(0x40)]);
        assert_eq!(live, 600);
    }

    #[test]
    fn low_only_and_high_only_access() {
        let (clock, mut pit) = pit();
        pit.write_port(0x43, 0x54); // channel 1, low byte only, mode 2
        pit.write_port(0x41, 0x12);
        clock.advance(ticks_to_ns(2));
        assert_eq!(pit.read_port(0x41), 0x10);
        pit.write_port(0x43, 0x64); // channel 1, high byte only, mode 2
        pit.write_port(0x41, 0x12);
        clock.advance(ticks_to_ns(0x100));
        assert_eq!(pit.read_port(0x41), 0x11);
    }

    #[test]
    fn read_back_latches_status_then_count() {
        let (clock, mut pit) = pit();
        program(&mut pit, 2, 0, 500);
        pit.write_port(0x61, 0x01);
        clock.advance(ticks_to_ns(200));
        pit.write_port(0x43, 0xc8); // read back count and status of channel 2
        clock.advance(ticks_to_ns(100));
        let status = pit.read_port(0x42);
        assert_eq!(status, 0x30, "OUT low, count loaded, lobyte/hibyte, mode 0");
        let count = u16::from_le_bytes([pit.read_port(0x42), pit.read_port(0x42)]);
        assert_eq!(count, 300);
    }

    #[test]
    fn status_reports_null_count_until_the_count_is_written() {
        let (_clock, mut pit) = pit();
        pit.write_port(0x43, 0xb6); // channel 2, lobyte/hibyte, mode 3
        assert_eq!(read_status(&mut pit, 2), 0x80 | 0x40 | 0x36);
        pit.write_port(0x42, 0x34);
        assert_eq!(read_status(&mut pit, 2) & 0x40, 0x40, "only half written");
        pit.write_port(0x42, 0x12);
        assert_eq!(read_status(&mut pit, 2) & 0x40, 0);
        // Mode 6 is an alias of mode 2; the BCD bit is kept.
        pit.write_port(0x43, 0x3d);
        assert_eq!(read_status(&mut pit, 0), 0x80 | 0x40 | 0x35);
    }

    #[test]
    fn port_61_gates_channel_2_and_shows_out2() {
        // Linux's PIT calibration: gate low, mode 0 on channel 2, gate high, poll bit 5.
        let (clock, mut pit) = pit();
        pit.write_port(0x61, 0x00);
        program(&mut pit, 2, 0, 0xffff);
        clock.advance(1_000_000);
        assert_eq!(latched_count(&mut pit, 2), 0xffff, "gate low: not counting");
        pit.write_port(0x61, 0x01);
        let gate_on = clock.now_ns();
        clock.set(gate_on + ticks_to_ns(0xfffe));
        assert_eq!(pit.read_port(0x61) & 0x21, 0x01);
        clock.set(gate_on + ticks_to_ns(0xffff));
        assert_eq!(pit.read_port(0x61) & 0x21, 0x21);
        assert_eq!(
            pit.tick(clock.now_ns()),
            0,
            "channel 2 does not drive IRQ 0"
        );
    }

    #[test]
    fn gate_low_pauses_mode_0() {
        let (clock, mut pit) = pit();
        pit.write_port(0x61, 0x01);
        program(&mut pit, 2, 0, 1000);
        clock.advance(ticks_to_ns(400));
        pit.write_port(0x61, 0x00);
        clock.advance(ticks_to_ns(5000));
        assert_eq!(latched_count(&mut pit, 2), 600);
        pit.write_port(0x61, 0x01);
        clock.advance(ticks_to_ns(100));
        assert_eq!(latched_count(&mut pit, 2), 500);
    }

    #[test]
    fn gate_restarts_modes_2_and_3_and_holds_out_high_while_low() {
        let (clock, mut pit) = pit();
        pit.write_port(0x61, 0x01);
        program(&mut pit, 2, 3, 100);
        clock.advance(ticks_to_ns(60));
        assert_eq!(pit.read_port(0x61) & 0x20, 0);
        pit.write_port(0x61, 0x00);
        assert_eq!(pit.read_port(0x61) & 0x20, 0x20);
        clock.advance(ticks_to_ns(7));
        pit.write_port(0x61, 0x01);
        clock.advance(ticks_to_ns(10));
        assert_eq!(
            latched_count(&mut pit, 2),
            80,
            "restarted from the full count"
        );
    }

    #[test]
    fn modes_1_and_5_wait_for_a_gate_trigger() {
        let (clock, mut pit) = pit();
        program(&mut pit, 2, 1, 50);
        clock.advance(ticks_to_ns(100));
        assert!(pit.out(2), "not triggered");
        pit.write_port(0x61, 0x01);
        clock.advance(ticks_to_ns(10));
        assert!(!pit.out(2));
        assert_eq!(latched_count(&mut pit, 2), 40);
        clock.advance(ticks_to_ns(40));
        assert!(pit.out(2));

        // On channel 0 the gate is tied high, so mode 1 never fires.
        program(&mut pit, 0, 1, 50);
        clock.advance(1_000_000);
        assert_eq!(pit.tick(clock.now_ns()), 0);
        assert_eq!(pit.next_deadline_ns(), None);

        program(&mut pit, 2, 5, 20);
        pit.write_port(0x61, 0x00);
        pit.write_port(0x61, 0x01);
        let triggered = clock.now_ns();
        clock.set(triggered + ticks_to_ns(20));
        assert!(!pit.out(2), "strobe");
        clock.set(triggered + ticks_to_ns(21));
        assert!(pit.out(2));
    }

    #[test]
    fn mode_4_strobes_once() {
        let (clock, mut pit) = pit();
        program(&mut pit, 0, 4, 10);
        assert!(pit.out(0));
        assert_eq!(pit.next_deadline_ns(), Some(START_NS + ticks_to_ns(11)));
        clock.advance(ticks_to_ns(10));
        assert!(!pit.out(0));
        assert_eq!(pit.tick(clock.now_ns()), 0);
        clock.advance(ticks_to_ns(1));
        assert_eq!(pit.tick(clock.now_ns()), 1);
        clock.advance(ticks_to_ns(100_000));
        assert_eq!(pit.tick(clock.now_ns()), 0);
    }

    #[test]
    fn reprogramming_restarts_the_edge_count() {
        let (clock, mut pit) = pit();
        program(&mut pit, 0, 2, 100);
        clock.advance(ticks_to_ns(250));
        assert_eq!(pit.tick(clock.now_ns()), 2);
        program(&mut pit, 0, 2, 1000);
        let reloaded = clock.now_ns();
        assert_eq!(pit.tick(clock.now_ns()), 0);
        assert_eq!(pit.next_deadline_ns(), Some(reloaded + ticks_to_ns(1000)));
        // A control word alone stops the channel.
        pit.write_port(0x43, 0x34);
        assert_eq!(pit.next_deadline_ns(), None);
        clock.advance(1_000_000_000);
        assert_eq!(pit.tick(clock.now_ns()), 0);
    }

    #[test]
    fn port_61_keeps_its_writable_bits_and_toggles_refresh() {
        let (clock, mut pit) = pit();
        pit.write_port(0x61, 0xff);
        // The clock never runs backwards: step to the next two refresh periods from now.
        let base = (clock.now_ns() / REFRESH_PERIOD_NS + 1) * REFRESH_PERIOD_NS;
        clock.set(base);
        let a = pit.read_port(0x61);
        clock.set(base + REFRESH_PERIOD_NS);
        let b = pit.read_port(0x61);
        assert_eq!(a & 0x0f, 0x0f);
        assert_ne!(a & 0x10, b & 0x10);
        assert_eq!(a & 0xc0, 0);
        assert!(pit.speaker_enabled());
        pit.write_port(0x61, 0x01);
        assert!(!pit.speaker_enabled());
    }

    #[test]
    fn the_control_port_and_strangers_read_0xff() {
        let (_clock, mut pit) = pit();
        assert_eq!(pit.read_port(0x43), 0xff);
        assert_eq!(pit.read_port(0x44), 0xff);
        assert!(!pit.out(7));
        let mut bytes = [0u8; 2];
        BusDevice::read(&mut pit, 0x40, 3, &mut bytes);
        assert_eq!(bytes, [0xff, 0xff]);
    }
}
