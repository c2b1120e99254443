//! MC146818 real-time clock and CMOS memory at ports 0x70-0x71.
//!
//! The clock is host time plus an offset the guest sets by writing the time registers.
//! Time is kept as "wall seconds": seconds since 1970-01-01 00:00 in the RTC's own zone
//! (local time by default, UTC with xhyve's `-u`), broken down with plain calendar arithmetic.
//! The update cycle is never reported in progress (UIP stays 0): a guest that waits for UIP to
//! clear proceeds at once, and reads are always consistent because they are computed whole.

use super::bus::BusDevice;

/// First port; the device decodes two.
pub const RTC_PORT: u16 = 0x70;
pub const RTC_PORT_COUNT: u64 = 2;

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

const A_UIP: u8 = 0x80;
/// 32.768 kHz time base, 1024 Hz periodic rate: the power-on value every BIOS leaves.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 0x80;
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

/// The RTC and its 128 bytes of CMOS memory.
pub struct Rtc {
    index: u8,
    cmos: [u8; 128],
    clock: Box<dyn WallClock>,
    /// Guest time minus host wall time, in seconds.
    offset: i64,
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
            REG_A => self.cmos[usize::from(REG_A)] = value & !A_UIP,
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
}
