//! MC146818 real-time clock and CMOS memory at ports 0x70-0x71.
//!
//! The clock is host time plus an offset the guest sets by writing the time registers.
//! Time is kept as "wall seconds": seconds since 1970-01-01 00:00 in the RTC's own zone
//! (local time by default, UTC with xhyve's `-u`), broken down with plain calendar arithmetic.
//! The update cycle is never reported in progress (UIP stays 0): a guest that waits for UIP to
//! clear proceeds at once, and reads are always consistent because they are computed whole.
//!
//! Interrupts (periodic, alarm, update-ended; IRQ 8) need a nanosecond clock and a line, given
//! with [`Rtc::with_interrupts`]; the VMM's timer thread then calls [`Rtc::tick`] at
//! [`Rtc::next_deadline_ns`]. Flags in register C are kept only while their interrupt is
//! enabled in register B, so that an idle RTC never wakes the timer thread.

use std::sync::Arc;

use super::bus::BusDevice;
use super::irq::InterruptLine;
use crate::intc::clock::Clock;

/// First port; the device decodes two.
pub const RTC_PORT: u16 = 0x70;
pub const RTC_PORT_COUNT: u64 = 2;
/// ISA IRQ 8, identity-mapped to IOAPIC pin 8.
pub const RTC_GSI: u32 = 8;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0A;
const REG_B: u8 = 0x0B;
const REG_C: u8 = 0x0C;
const REG_D: u8 = 0x0D;
const REG_CENTURY: u8 = 0x32;

const TIME_REGISTERS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
];

const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS_ALARM: u8 = 0x05;
/// An alarm byte with both top bits set matches any value.
const ALARM_DONT_CARE: u8 = 0xC0;

const A_UIP: u8 = 0x80;
const A_DIVIDER_MASK: u8 = 0x70;
/// The only divider setting with which the oscillator runs: the 32.768 kHz time base.
const A_DIVIDER_32K: u8 = 0x20;
const A_RATE_MASK: u8 = 0x0F;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_INTERRUPT_ENABLES: u8 = B_PIE | B_AIE | B_UIE;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const NS_PER_SEC: u64 = 1_000_000_000;
/// 32.768 kHz time base, 1024 Hz periodic rate: the power-on value every BIOS leaves.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 0x80;
const B_SQWE: u8 = 0x08;
const B_BINARY: u8 = 0x04;
const B_24_HOUR: u8 = 0x02;
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;

/// Where the RTC gets the current time: seconds since the Unix epoch in the RTC's zone.
pub trait WallClock: Send {
    fn wall_seconds(&self) -> i64;
}

/// The host clock, in local time or UTC.
pub struct HostClock {
    pub utc: bool,
}

impl WallClock for HostClock {
    fn wall_seconds(&self) -> i64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if self.utc {
            return now;
        }
        // SAFETY: tm is plain old data; localtime_r fills it from `t`, and its result is
        // checked before `tm` is used.
        unsafe {
            let t = now as libc::time_t;
            let mut tm: libc::tm = std::mem::zeroed();
            if libc::localtime_r(&t, &mut tm).is_null() {
                return now;
            }
            now + tm.tm_gmtoff as i64
        }
    }
}

/// Broken-down calendar time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday .. 7 = Saturday, as the RTC counts.
    weekday: u8,
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_seconds(secs: i64) -> DateTime {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    DateTime {
        year,
        month,
        day,
        hour: (rem / 3600) as u8,
        minute: (rem / 60 % 60) as u8,
        second: (rem % 60) as u8,
        // 1970-01-01 was a Thursday (RTC weekday 5).
        weekday: ((days + 4).rem_euclid(7) + 1) as u8,
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> Option<u8> {
    let (hi, lo) = (v >> 4, v & 0x0F);
    (hi < 10 && lo < 10).then_some(hi * 10 + lo)
}

/// The periodic interrupt's period for register A, if the oscillator runs and a rate is set.
fn periodic_period_ns(reg_a: u8) -> Option<u64> {
    if reg_a & A_DIVIDER_MASK != A_DIVIDER_32K {
        return None;
    }
    let rate = match reg_a & A_RATE_MASK {
        0 => return None,
        // Rates 1 and 2 repeat rates 8 and 9 (256 and 128 Hz) on the 32.768 kHz time base.
        r @ (1 | 2) => r + 7,
        r => r,
    };
    // 2^(rate-1) cycles of 32.768 kHz; truncation loses under 1 ns a period.
    Some((NS_PER_SEC << (rate - 1)) / 32_768)
}

/// What the RTC needs to raise interrupts: time in nanoseconds, IRQ 8, and its schedule.
struct Interrupts {
    clock: Arc<dyn Clock>,
    line: Arc<dyn InterruptLine>,
    /// The next periodic interrupt, while PIE is set and the rate is valid.
    next_periodic_ns: Option<u64>,
    /// The next end of an update cycle (once a second, phase fixed at creation).
    next_update_ns: u64,
}

/// The RTC and its 128 bytes of CMOS memory.
pub struct Rtc {
    index: u8,
    cmos: [u8; 128],
    clock: Box<dyn WallClock>,
    /// Guest time minus host wall time, in seconds.
    offset: i64,
    interrupts: Option<Interrupts>,
}

impl Rtc {
    /// An RTC reading `clock`, with CMOS memory-size bytes for `lowmem`/`highmem` bytes of RAM
    /// below 4 GiB and from 4 GiB.
    pub fn new(clock: Box<dyn WallClock>, lowmem: u64, highmem: u64) -> Self {
        let mut rtc = Rtc {
            index: 0,
            cmos: [0; 128],
            clock,
            offset: 0,
            interrupts: None,
        };
        rtc.cmos[usize::from(REG_A)] = A_DEFAULT;
        rtc.cmos[usize::from(REG_B)] = B_24_HOUR;
        rtc.cmos[usize::from(REG_D)] = D_VRT;
        rtc.set_memory_size(lowmem, highmem);
        rtc
    }

    /// The host's clock in local time, or UTC when `utc` (xhyve's `-u`).
    pub fn with_host_clock(utc: bool, lowmem: u64, highmem: u64) -> Self {
        Self::new(Box::new(HostClock { utc }), lowmem, highmem)
    }

    /// Lets the RTC raise its periodic, alarm and update-ended interrupts on `line` (IRQ 8),
    /// timed by `clock`.
    pub fn with_interrupts(mut self, clock: Arc<dyn Clock>, line: Arc<dyn InterruptLine>) -> Self {
        let now = clock.now_ns();
        self.interrupts = Some(Interrupts {
            clock,
            line,
            next_periodic_ns: None,
            next_update_ns: now.saturating_add(NS_PER_SEC),
        });
        self.reschedule();
        self
    }

    /// When the RTC next needs [`Rtc::tick`], on the interrupt clock.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let timing = self.interrupts.as_ref()?;
        let b = self.reg_b();
        let periodic = timing.next_periodic_ns.filter(|_| b & B_PIE != 0);
        let updates_run = b & B_SET == 0 && b & (B_UIE | B_AIE) != 0;
        let update = updates_run.then_some(timing.next_update_ns);
        match (periodic, update) {
            (Some(p), Some(u)) => Some(p.min(u)),
            (p, u) => p.or(u),
        }
    }

    /// Raises whatever fell due by `now_ns`. Missed periods are dropped, not replayed in a
    /// burst: the guest sees one interrupt per tick, as from a late real RTC.
    pub fn tick(&mut self, now_ns: u64) {
        let b = self.reg_b();
        let Some(timing) = self.interrupts.as_mut() else {
            return;
        };
        let mut flags = 0;
        if let (Some(due), Some(period)) = (
            timing.next_periodic_ns,
            periodic_period_ns(self.cmos[usize::from(REG_A)]),
        ) {
            if b & B_PIE != 0 && due <= now_ns {
                flags |= C_PF;
                timing.next_periodic_ns = Some(advance_past(due, period, now_ns));
            }
        }
        let update_due = timing.next_update_ns <= now_ns;
        if update_due {
            timing.next_update_ns = advance_past(timing.next_update_ns, NS_PER_SEC, now_ns);
        }
        if update_due && b & B_SET == 0 && b & (B_UIE | B_AIE) != 0 {
            flags |= C_UF;
            self.latch_time();
            if self.alarm_matches() {
                flags |= C_AF;
            }
        }
        self.set_flags(flags);
    }

    fn alarm_matches(&self) -> bool {
        [
            (REG_SECONDS_ALARM, REG_SECONDS),
            (REG_MINUTES_ALARM, REG_MINUTES),
            (REG_HOURS_ALARM, REG_HOURS),
        ]
        .iter()
        .all(|&(alarm, now)| {
            let alarm = self.cmos[usize::from(alarm)];
            alarm & ALARM_DONT_CARE == ALARM_DONT_CARE || alarm == self.cmos[usize::from(now)]
        })
    }

    /// Sets register C flags and raises IRQ 8 on the edge of IRQF: the line stays asserted on
    /// a real RTC until the guest reads C, so no second edge comes before that.
    fn set_flags(&mut self, flags: u8) {
        let c = self.cmos[usize::from(REG_C)] | flags;
        let was_raised = c & C_IRQF != 0;
        let enabled = c & self.reg_b() & B_INTERRUPT_ENABLES;
        self.cmos[usize::from(REG_C)] = c;
        if enabled != 0 && !was_raised {
            self.cmos[usize::from(REG_C)] = c | C_IRQF;
            if let Some(timing) = &self.interrupts {
                timing.line.pulse();
            }
        }
    }

    /// The MC146818's RESET pin, which a PC drives at a reset: interrupt enables and square
    /// wave off in register B, register C's flags clear. The clock, the rest of register B,
    /// the alarm and the CMOS memory are battery-backed and stay.
    pub fn power_on_reset(&mut self) {
        self.cmos[usize::from(REG_B)] &= !(B_INTERRUPT_ENABLES | B_SQWE);
        self.cmos[usize::from(REG_C)] = 0;
        self.index = 0;
        self.reschedule();
    }

    /// Recomputes the schedule after a register A or B write.
    fn reschedule(&mut self) {
        let a = self.cmos[usize::from(REG_A)];
        let b = self.reg_b();
        let Some(timing) = self.interrupts.as_mut() else {
            return;
        };
        let now = timing.clock.now_ns();
        timing.next_periodic_ns = match periodic_period_ns(a) {
            Some(period) if b & B_PIE != 0 => Some(
                timing
                    .next_periodic_ns
                    .filter(|&due| due > now)
                    .unwrap_or(now.saturating_add(period)),
            ),
            _ => None,
        };
        // Keep the once-a-second phase, but never leave it in the past: a late enable must
        // not see an update that ended while updates were off.
        if timing.next_update_ns <= now {
            timing.next_update_ns = advance_past(timing.next_update_ns, NS_PER_SEC, now);
        }
    }

    fn set_memory_size(&mut self, lowmem: u64, highmem: u64) {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        const CHUNK: u64 = 64 * KIB;
        let mut put =
            |reg: usize, bytes: &[u8]| self.cmos[reg..reg + bytes.len()].copy_from_slice(bytes);
        // Conventional memory: always 640 KiB.
        put(0x15, &640u16.to_le_bytes());
        // Extended memory above 1 MiB in KiB, as the 16-bit field allows.
        let extended = (lowmem.saturating_sub(MIB) / KIB).min(0xFFFF) as u16;
        put(0x17, &extended.to_le_bytes());
        put(0x30, &extended.to_le_bytes());
        // What UEFI reads: 64 KiB chunks between 16 MiB and the end of low RAM, and above 4 GiB.
        let above_16m = (lowmem.saturating_sub(16 * MIB) / CHUNK).min(0xFFFF) as u16;
        put(0x34, &above_16m.to_le_bytes());
        let above_4g = (highmem / CHUNK).min(0xFF_FFFF) as u32;
        put(0x5B, &above_4g.to_le_bytes()[..3]);
    }

    fn reg_b(&self) -> u8 {
        self.cmos[usize::from(REG_B)]
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b() & B_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> Option<u8> {
        if self.reg_b() & B_BINARY != 0 {
            Some(v)
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg_b() & B_24_HOUR != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> Option<u8> {
        if self.reg_b() & B_24_HOUR != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & !HOUR_PM)?;
        if !(1..=12).contains(&h12) {
            return None;
        }
        Some(h12 % 12 + if v & HOUR_PM != 0 { 12 } else { 0 })
    }

    /// Writes the current guest time into the time registers.
    fn latch_time(&mut self) {
        let t = civil_from_seconds(self.clock.wall_seconds().saturating_add(self.offset));
        let year = t.year.rem_euclid(10_000);
        let fields = [
            (REG_SECONDS, self.encode(t.second)),
            (REG_MINUTES, self.encode(t.minute)),
            (REG_HOURS, self.encode_hour(t.hour)),
            (REG_WEEKDAY, self.encode(t.weekday)),
            (REG_DAY, self.encode(t.day)),
            (REG_MONTH, self.encode(t.month)),
            (REG_YEAR, self.encode((year % 100) as u8)),
            (REG_CENTURY, self.encode((year / 100) as u8)),
        ];
        for (reg, value) in fields {
            self.cmos[usize::from(reg)] = value;
        }
    }

    /// Sets the offset from the time registers; an invalid date keeps the old offset.
    fn adopt_time_registers(&mut self) {
        let reg = |r: u8| self.cmos[usize::from(r)];
        let parsed = (|| {
            let second = self.decode(reg(REG_SECONDS)).filter(|&v| v < 60)?;
            let minute = self.decode(reg(REG_MINUTES)).filter(|&v| v < 60)?;
            let hour = self.decode_hour(reg(REG_HOURS)).filter(|&v| v < 24)?;
            let day = self
                .decode(reg(REG_DAY))
                .filter(|&v| (1..=31).contains(&v))?;
            let month = self
                .decode(reg(REG_MONTH))
                .filter(|&v| (1..=12).contains(&v))?;
            let year = self.decode(reg(REG_YEAR)).filter(|&v| v < 100)?;
            let century = self.decode(reg(REG_CENTURY)).filter(|&v| v < 100)?;
            let year = i64::from(century) * 100 + i64::from(year);
            let days = days_from_civil(year, month, day);
            Some(
                days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second),
            )
        })();
        if let Some(guest) = parsed {
            self.offset = guest - self.clock.wall_seconds();
        }
    }

    fn read_data(&mut self) -> u8 {
        let index = self.index;
        let setting = self.reg_b() & B_SET != 0;
        if TIME_REGISTERS.contains(&index) && !setting {
            self.latch_time();
        }
        let value = self.cmos[usize::from(index)];
        match index {
            REG_A => value & !A_UIP,
            // Reading C acknowledges every interrupt flag.
            REG_C => {
                self.cmos[usize::from(REG_C)] = 0;
                value
            }
            _ => value,
        }
    }

    fn write_data(&mut self, value: u8) {
        let index = self.index;
        match index {
            REG_A => {
                let old = self.cmos[usize::from(REG_A)];
                self.cmos[usize::from(REG_A)] = value & !A_UIP;
                if periodic_period_ns(old) != periodic_period_ns(value) {
                    // A new rate starts a new period.
                    if let Some(timing) = self.interrupts.as_mut() {
                        timing.next_periodic_ns = None;
                    }
                }
                self.reschedule();
            }
            REG_B => {
                let was_setting = self.reg_b() & B_SET != 0;
                let now_setting = value & B_SET != 0;
                if now_setting && !was_setting {
                    // Freeze the registers at the current time for the guest to edit.
                    self.latch_time();
                }
                if !now_setting && was_setting {
                    // The guest's registers are in the format it had while setting.
                    self.adopt_time_registers();
                }
                self.cmos[usize::from(REG_B)] = value;
                self.reschedule();
                // Enabling an interrupt whose flag is already set raises it at once.
                self.set_flags(0);
            }
            REG_C | REG_D => {}
            _ if TIME_REGISTERS.contains(&index) => {
                if self.reg_b() & B_SET != 0 {
                    self.cmos[usize::from(index)] = value;
                } else {
                    // A running clock takes the new field at once.
                    self.latch_time();
                    self.cmos[usize::from(index)] = value;
                    self.adopt_time_registers();
                }
            }
            _ => self.cmos[usize::from(index)] = value,
        }
    }
}

/// The first `start + k * period` after `now` (k >= 1).
fn advance_past(start: u64, period: u64, now: u64) -> u64 {
    let missed = now.saturating_sub(start) / period.max(1);
    start.saturating_add(period.saturating_mul(missed + 1))
}

impl BusDevice for Rtc {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            0 => self.index,
            1 => self.read_data(),
            _ => 0xFF,
        };
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            // Bit 7 masks NMIs on real hardware; there are none to mask here.
            0 => self.index = value & 0x7F,
            1 => self.write_data(value),
            _ => {}
        }
    }
}

impl super::PowerOnReset for Rtc {
    fn power_on_reset(&mut self) {
        Rtc::power_on_reset(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;

    struct FixedClock(Arc<AtomicI64>);
    impl WallClock for FixedClock {
        fn wall_seconds(&self) -> i64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// 2024-02-29 (a Thursday) 13:45:07.
    const T0: i64 = 1_709_214_307;

    fn rtc_at(secs: i64) -> (Rtc, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(secs));
        (
            Rtc::new(Box::new(FixedClock(now.clone())), 256 << 20, 0),
            now,
        )
    }

    fn get(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0x70, 0, &[reg | 0x80]);
        let mut d = [0u8];
        rtc.read(0x70, 1, &mut d);
        d[0]
    }

    fn set(rtc: &mut Rtc, reg: u8, v: u8) {
        rtc.write(0x70, 0, &[reg]);
        rtc.write(0x70, 1, &[v]);
    }

    #[test]
    fn a_machine_reset_clears_interrupts_and_keeps_time_and_memory() {
        let (mut rtc, _now) = rtc_at(T0);
        set(&mut rtc, REG_MINUTES, 0x15);
        set(&mut rtc, 0x40, 0x5A); // CMOS memory
        set(&mut rtc, REG_B, B_24_HOUR | B_PIE | B_UIE | B_SQWE);
        let minutes = get(&mut rtc, REG_MINUTES);
        rtc.cmos[usize::from(REG_C)] = C_IRQF | C_PF;
        rtc.power_on_reset();
        assert_eq!(get(&mut rtc, REG_B), B_24_HOUR, "enables and SQWE off");
        assert_eq!(get(&mut rtc, REG_C), 0);
        assert_eq!(get(&mut rtc, REG_MINUTES), minutes, "the time set stays");
        assert_eq!(get(&mut rtc, 0x40), 0x5A, "battery-backed memory stays");
    }

    #[test]
    fn host_clock_tracks_system_time() {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let utc = HostClock { utc: true }.wall_seconds();
        assert!((utc - unix).abs() <= 2, "utc {utc} vs {unix}");
        let local = HostClock { utc: false }.wall_seconds();
        let zone_offset = local - utc;
        // Zone offsets are whole quarter hours within a day of UTC.
        let rounded = (zone_offset as f64 / 900.0).round() as i64 * 900;
        assert!((zone_offset - rounded).abs() <= 2 && rounded.abs() <= 14 * 3600);
    }

    #[test]
    fn calendar_round_trips() {
        for secs in [
            0,
            T0,
            951_782_400, /* 2000-02-29 */
            4_107_542_399,
            -86_400,
        ] {
            let t = civil_from_seconds(secs);
            let back = days_from_civil(t.year, t.month, t.day) * 86_400
                + i64::from(t.hour) * 3600
                + i64::from(t.minute) * 60
                + i64::from(t.second);
            assert_eq!(back, secs);
        }
        let t = civil_from_seconds(T0);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2024, 2, 29, 5));
    }

    #[test]
    fn time_reads_as_bcd_by_default() {
        let (mut rtc, _) = rtc_at(T0);
        assert_eq!(get(&mut rtc, REG_SECONDS), 0x07);
        assert_eq!(get(&mut rtc, REG_MINUTES), 0x45);
        assert_eq!(get(&mut rtc, REG_HOURS), 0x13);
        assert_eq!(get(&mut rtc, REG_WEEKDAY), 0x05);
        assert_eq!(get(&mut rtc, REG_DAY), 0x29);
        assert_eq!(get(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(get(&mut rtc, REG_YEAR), 0x24);
        assert_eq!(get(&mut rtc, REG_CENTURY), 0x20);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let (mut rtc, _) = rtc_at(T0);
        set(&mut rtc, REG_B, B_BINARY | B_24_HOUR);
        assert_eq!(get(&mut rtc, REG_HOURS), 13);
        assert_eq!(get(&mut rtc, REG_MINUTES), 45);
        assert_eq!(get(&mut rtc, REG_CENTURY), 20);
        set(&mut rtc, REG_B, 0); // BCD, 12-hour
        assert_eq!(get(&mut rtc, REG_HOURS), 0x80 | 0x01);
        set(&mut rtc, REG_B, B_BINARY);
        assert_eq!(get(&mut rtc, REG_HOURS), 0x80 | 1);
        let (mut midnight, _) = rtc_at(T0 - 13 * 3600);
        set(&mut midnight, REG_B, 0);
        assert_eq!(get(&mut midnight, REG_HOURS), 0x12); // 12 AM
    }

    #[test]
    fn status_registers_are_sane() {
        let (mut rtc, _) = rtc_at(T0);
        assert_eq!(get(&mut rtc, REG_A) & A_UIP, 0);
        assert_eq!(get(&mut rtc, REG_B), B_24_HOUR);
        assert_eq!(get(&mut rtc, REG_C), 0);
        assert_eq!(get(&mut rtc, REG_D), D_VRT);
        set(&mut rtc, REG_D, 0);
        set(&mut rtc, REG_A, 0xFF);
        assert_eq!(get(&mut rtc, REG_D), D_VRT);
        assert_eq!(get(&mut rtc, REG_A), 0x7F);
    }

    #[test]
    fn guest_set_time_keeps_an_offset_from_the_host() {
        let (mut rtc, now) = rtc_at(T0);
        set(&mut rtc, REG_B, B_SET | B_24_HOUR);
        // While SET, the registers hold what the guest writes.
        set(&mut rtc, REG_YEAR, 0x99);
        set(&mut rtc, REG_CENTURY, 0x19);
        set(&mut rtc, REG_DAY, 0x28);
        set(&mut rtc, REG_HOURS, 0x23);
        assert_eq!(get(&mut rtc, REG_HOURS), 0x23);
        now.fetch_add(1000, Ordering::SeqCst);
        assert_eq!(get(&mut rtc, REG_SECONDS), 0x07, "frozen while SET");
        // Clearing SET starts the clock from 1999-02-28 23:45:07.
        set(&mut rtc, REG_B, B_24_HOUR);
        assert_eq!(get(&mut rtc, REG_YEAR), 0x99);
        assert_eq!(get(&mut rtc, REG_CENTURY), 0x19);
        assert_eq!(get(&mut rtc, REG_DAY), 0x28);
        assert_eq!(get(&mut rtc, REG_HOURS), 0x23);
        now.fetch_add(60, Ordering::SeqCst);
        assert_eq!(
            get(&mut rtc, REG_MINUTES),
            0x46,
            "the guest's clock keeps running"
        );
    }

    #[test]
    fn invalid_guest_time_is_ignored() {
        let (mut rtc, _) = rtc_at(T0);
        set(&mut rtc, REG_B, B_SET | B_24_HOUR);
        set(&mut rtc, REG_MONTH, 0x13);
        set(&mut rtc, REG_B, B_24_HOUR);
        assert_eq!(get(&mut rtc, REG_MONTH), 0x02);
        assert_eq!(get(&mut rtc, REG_YEAR), 0x24);
    }

    #[test]
    fn cmos_memory_is_plain_storage_and_the_index_masks_nmi() {
        let (mut rtc, _) = rtc_at(T0);
        set(&mut rtc, 0x40, 0x5A);
        assert_eq!(get(&mut rtc, 0x40), 0x5A);
        rtc.write(0x70, 0, &[0x80 | 0x40]);
        let mut d = [0u8];
        rtc.read(0x70, 0, &mut d);
        assert_eq!(d[0], 0x40);
    }

    fn word(rtc: &mut Rtc, reg: u8) -> u32 {
        u32::from(get(rtc, reg)) | u32::from(get(rtc, reg + 1)) << 8
    }

    #[test]
    fn memory_size_bytes_for_256m() {
        let mut rtc = Rtc::new(Box::new(FixedClock(Arc::default())), 256 << 20, 0);
        assert_eq!(word(&mut rtc, 0x15), 640);
        assert_eq!(word(&mut rtc, 0x17), 0xFFFF);
        assert_eq!(word(&mut rtc, 0x30), 0xFFFF);
        assert_eq!(word(&mut rtc, 0x34), (240 << 20) / (64 << 10));
        assert_eq!(
            (
                get(&mut rtc, 0x5B),
                get(&mut rtc, 0x5C),
                get(&mut rtc, 0x5D)
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn memory_size_bytes_for_5g() {
        let mut rtc = Rtc::new(Box::new(FixedClock(Arc::default())), 3 << 30, 2 << 30);
        assert_eq!(
            word(&mut rtc, 0x34),
            ((3u32 << 30) - (16 << 20)) / (64 << 10)
        );
        let high = u32::from(get(&mut rtc, 0x5B))
            | u32::from(get(&mut rtc, 0x5C)) << 8
            | u32::from(get(&mut rtc, 0x5D)) << 16;
        assert_eq!(high, (2u32 << 30) / (64 << 10));
    }

    #[test]
    fn small_ram_reports_extended_memory_exactly() {
        let mut rtc = Rtc::new(Box::new(FixedClock(Arc::default())), 8 << 20, 0);
        assert_eq!(word(&mut rtc, 0x17), 7 * 1024);
        assert_eq!(word(&mut rtc, 0x34), 0);
    }

    use crate::devices::irq::test_util::RecordingLine;
    use crate::intc::clock::ManualClock;

    /// An RTC with interrupts on a recording IRQ 8, at `T0` on both clocks.
    fn rtc_with_irq() -> (Rtc, Arc<ManualClock>, Arc<RecordingLine>) {
        let (rtc, _) = rtc_at(T0);
        let ticks = Arc::new(ManualClock::new(0));
        let line = Arc::new(RecordingLine {
            gsi: 8,
            ..Default::default()
        });
        let rtc = rtc.with_interrupts(ticks.clone(), line.clone());
        (rtc, ticks, line)
    }

    fn pulses(line: &RecordingLine) -> usize {
        line.levels.lock().unwrap().iter().filter(|&&l| l).count()
    }

    /// Ticks at every deadline up to `until_ns`, as the timer thread does.
    fn run_until(rtc: &mut Rtc, clock: &ManualClock, until_ns: u64) {
        while let Some(due) = rtc.next_deadline_ns().filter(|&d| d <= until_ns) {
            clock.set(due);
            rtc.tick(due);
        }
        clock.set(until_ns);
    }

    #[test]
    fn periodic_rates_follow_register_a() {
        assert_eq!(periodic_period_ns(0x26), Some(976_562)); // 1024 Hz
        assert_eq!(periodic_period_ns(0x2F), Some(500_000_000)); // 2 Hz
        assert_eq!(periodic_period_ns(0x23), Some(122_070)); // 8192 Hz
        assert_eq!(periodic_period_ns(0x21), periodic_period_ns(0x28)); // 256 Hz
        assert_eq!(periodic_period_ns(0x22), periodic_period_ns(0x29)); // 128 Hz
        assert_eq!(periodic_period_ns(0x20), None, "rate 0 is off");
        assert_eq!(periodic_period_ns(0x66), None, "divider held in reset");
    }

    #[test]
    fn no_deadline_until_an_interrupt_is_enabled() {
        let (mut rtc, clock, line) = rtc_with_irq();
        assert_eq!(rtc.next_deadline_ns(), None);
        run_until(&mut rtc, &clock, 5 * NS_PER_SEC);
        assert_eq!(pulses(&line), 0);
        assert_eq!(get(&mut rtc, REG_C), 0);
    }

    #[test]
    fn periodic_interrupt_at_the_programmed_rate_once_c_is_read() {
        let (mut rtc, clock, line) = rtc_with_irq();
        set(&mut rtc, REG_A, 0x2A); // 64 Hz: 15.625 ms
        set(&mut rtc, REG_B, B_24_HOUR | B_PIE);
        assert_eq!(rtc.next_deadline_ns(), Some(15_625_000));
        let mut taken = 0;
        for period in 1..=64u64 {
            run_until(&mut rtc, &clock, period * 15_625_000);
            assert_eq!(pulses(&line), period as usize, "one edge per period");
            // The handler reads C, which acknowledges and lets the next edge through.
            assert_eq!(get(&mut rtc, REG_C), C_IRQF | C_PF);
            taken += 1;
        }
        assert_eq!(taken, 64, "64 interrupts in one second at 64 Hz");
    }

    #[test]
    fn an_unread_register_c_holds_the_line_without_new_edges() {
        let (mut rtc, clock, line) = rtc_with_irq();
        set(&mut rtc, REG_A, 0x2A);
        set(&mut rtc, REG_B, B_24_HOUR | B_PIE);
        run_until(&mut rtc, &clock, 10 * 15_625_000);
        assert_eq!(pulses(&line), 1);
        assert_eq!(get(&mut rtc, REG_C), C_IRQF | C_PF);
        assert_eq!(get(&mut rtc, REG_C), 0, "reading C clears it");
        run_until(&mut rtc, &clock, 11 * 15_625_000);
        assert_eq!(pulses(&line), 2);
    }

    #[test]
    fn clearing_pie_stops_the_periodic_interrupt() {
        let (mut rtc, clock, line) = rtc_with_irq();
        set(&mut rtc, REG_A, 0x2F);
        set(&mut rtc, REG_B, B_24_HOUR | B_PIE);
        set(&mut rtc, REG_B, B_24_HOUR);
        assert_eq!(rtc.next_deadline_ns(), None);
        run_until(&mut rtc, &clock, 3 * NS_PER_SEC);
        assert_eq!(pulses(&line), 0);
    }

    #[test]
    fn a_late_tick_drops_missed_periods() {
        let (mut rtc, clock, line) = rtc_with_irq();
        set(&mut rtc, REG_A, 0x2F); // 2 Hz
        set(&mut rtc, REG_B, B_24_HOUR | B_PIE);
        clock.set(1_750_000_000);
        rtc.tick(1_750_000_000);
        assert_eq!(pulses(&line), 1);
        assert_eq!(rtc.next_deadline_ns(), Some(2_000_000_000));
    }

    #[test]
    fn update_ended_interrupt_once_a_second() {
        let (mut rtc, clock, line) = rtc_with_irq();
        set(&mut rtc, REG_B, B_24_HOUR | B_UIE);
        assert_eq!(rtc.next_deadline_ns(), Some(NS_PER_SEC));
        for second in 1..=3u64 {
            run_until(&mut rtc, &clock, second * NS_PER_SEC);
            assert_eq!(pulses(&line), second as usize);
            assert_eq!(get(&mut rtc, REG_C), C_IRQF | C_UF);
        }
    }

    #[test]
    fn set_bit_stops_update_interrupts() {
        let (mut rtc, clock, line) = rtc_with_irq();
        set(&mut rtc, REG_B, B_SET | B_24_HOUR | B_UIE);
        assert_eq!(rtc.next_deadline_ns(), None);
        run_until(&mut rtc, &clock, 3 * NS_PER_SEC);
        assert_eq!(pulses(&line), 0);
    }

    #[test]
    fn a_late_enable_sees_no_stale_update() {
        let (mut rtc, clock, line) = rtc_with_irq();
        clock.set(5_500_000_000);
        set(&mut rtc, REG_B, B_24_HOUR | B_UIE);
        assert_eq!(rtc.next_deadline_ns(), Some(6 * NS_PER_SEC));
        rtc.tick(5_500_000_000);
        assert_eq!(pulses(&line), 0);
    }

    #[test]
    fn alarm_fires_when_the_time_matches() {
        let (mut rtc, clock, line) = rtc_with_irq();
        // T0 is 13:45:07; the host's wall clock stands still, so the alarm is set for it.
        set(&mut rtc, REG_SECONDS_ALARM, 0x07);
        set(&mut rtc, REG_MINUTES_ALARM, 0x45);
        set(&mut rtc, REG_HOURS_ALARM, 0x13);
        set(&mut rtc, REG_B, B_24_HOUR | B_AIE);
        run_until(&mut rtc, &clock, NS_PER_SEC);
        assert_eq!(pulses(&line), 1);
        // UF is set alongside, but only AF raised the interrupt (UIE is off).
        assert_eq!(get(&mut rtc, REG_C), C_IRQF | C_AF | C_UF);
    }

    #[test]
    fn alarm_does_not_fire_on_a_mismatch_and_dont_care_matches_anything() {
        let (mut rtc, clock, line) = rtc_with_irq();
        set(&mut rtc, REG_SECONDS_ALARM, 0x08);
        set(&mut rtc, REG_MINUTES_ALARM, 0x45);
        set(&mut rtc, REG_HOURS_ALARM, 0x13);
        set(&mut rtc, REG_B, B_24_HOUR | B_AIE);
        run_until(&mut rtc, &clock, NS_PER_SEC);
        assert_eq!(pulses(&line), 0);
        assert_eq!(get(&mut rtc, REG_C), C_UF, "flag without interrupt");
        set(&mut rtc, REG_SECONDS_ALARM, 0xFF);
        set(&mut rtc, REG_HOURS_ALARM, 0xC0);
        run_until(&mut rtc, &clock, 2 * NS_PER_SEC);
        assert_eq!(pulses(&line), 1);
    }

    #[test]
    fn enabling_an_interrupt_with_its_flag_set_raises_it() {
        let (mut rtc, clock, line) = rtc_with_irq();
        set(&mut rtc, REG_B, B_24_HOUR | B_AIE);
        run_until(&mut rtc, &clock, NS_PER_SEC); // UF set, AIE does not match 0x00 alarms
        assert_eq!(pulses(&line), 0);
        set(&mut rtc, REG_B, B_24_HOUR | B_AIE | B_UIE);
        assert_eq!(pulses(&line), 1);
        assert_eq!(get(&mut rtc, REG_C), C_IRQF | C_UF);
    }
}
