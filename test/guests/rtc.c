/* Reads the wall-clock time from the CMOS RTC. */
#include "tests.h"

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define REG_SECONDS 0x00
#define REG_MINUTES 0x02
#define REG_HOURS 0x04
#define REG_DAY 0x07
#define REG_MONTH 0x08
#define REG_YEAR 0x09
#define REG_A 0x0A
#define REG_B 0x0B
#define REG_CENTURY 0x32
#define REG_A_UPDATE_IN_PROGRESS 0x80
#define REG_B_24_HOUR 0x02
#define REG_B_BINARY 0x04
#define HOUR_PM 0x80

struct rtc_time {
    u32 seconds, minutes, hours, day, month, year, century;
};

static u32 cmos_read(u32 reg)
{
    outb(CMOS_INDEX, (u8)reg);
    return inb(CMOS_DATA);
}

static void read_raw(struct rtc_time *t)
{
    /* Bounded: an RTC stuck in update must not hang the guest forever;
     * the time printed then shows the host test what went wrong. */
    for (u32 spins = 0; spins < 100000; spins++)
        if (!(cmos_read(REG_A) & REG_A_UPDATE_IN_PROGRESS))
            break;
    t->seconds = cmos_read(REG_SECONDS);
    t->minutes = cmos_read(REG_MINUTES);
    t->hours = cmos_read(REG_HOURS);
    t->day = cmos_read(REG_DAY);
    t->month = cmos_read(REG_MONTH);
    t->year = cmos_read(REG_YEAR);
    t->century = cmos_read(REG_CENTURY);
}

static int same_time(const struct rtc_time *a, const struct rtc_time *b)
{
    return a->seconds == b->seconds && a->minutes == b->minutes && a->hours == b->hours &&
           a->day == b->day && a->month == b->month && a->year == b->year &&
           a->century == b->century;
}

static u32 bcd_to_binary(u32 v)
{
    return (v >> 4) * 10 + (v & 0x0F);
}

void test_rtc(const struct mb_info *mbi)
{
    (void)mbi;
    struct rtc_time t, again;
    /* Two identical reads in a row mean no update happened in between. */
    read_raw(&t);
    for (int tries = 0; tries < 10; tries++) {
        read_raw(&again);
        if (same_time(&t, &again))
            break;
        t = again;
    }

    u32 reg_b = cmos_read(REG_B);
    int pm = (t.hours & HOUR_PM) != 0;
    t.hours &= ~HOUR_PM;
    if (!(reg_b & REG_B_BINARY)) {
        t.seconds = bcd_to_binary(t.seconds);
        t.minutes = bcd_to_binary(t.minutes);
        t.hours = bcd_to_binary(t.hours);
        t.day = bcd_to_binary(t.day);
        t.month = bcd_to_binary(t.month);
        t.year = bcd_to_binary(t.year);
        t.century = bcd_to_binary(t.century);
    }
    if (!(reg_b & REG_B_24_HOUR))
        t.hours = (t.hours % 12) + (pm ? 12 : 0);
    /* Not every RTC keeps a century byte; assume the 2000s without one. */
    if (t.century < 19 || t.century > 30)
        t.century = 20;

    puts("rtc ");
    print_dec_pad(t.century * 100 + t.year, 4);
    putc('-');
    print_dec_pad(t.month, 2);
    putc('-');
    print_dec_pad(t.day, 2);
    putc(' ');
    print_dec_pad(t.hours, 2);
    putc(':');
    print_dec_pad(t.minutes, 2);
    putc(':');
    print_dec_pad(t.seconds, 2);
    putc('\n');
    poweroff();
}
